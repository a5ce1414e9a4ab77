//! Compiles llama-cpt's cuda/*.cu for the host (to be written: emu/cxx/).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
