//! The C ABI of the host-compiled kernels (emu/cxx/, built by emu/build.rs).
