// Shared by build.rs (the fatbin) and emu/build.rs (the host kernels' register counts), each with
// `include!`: where nvcc is, and ptxas' `-Xptxas -v` resource report.

/// nvcc from `NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, the `PATH`, then the pinned PyPI
/// toolchain of tools/install-cuda-toolchain.sh under the repository root `root`.
fn find_nvcc(root: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::env;
    use std::path::PathBuf;
    let exe = |p: PathBuf| if p.is_file() { Some(p) } else { None };
    if let Some(p) = env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            if let Some(p) = exe(PathBuf::from(home).join("bin").join("nvcc")) {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            if let Some(p) = exe(dir.join("nvcc")) {
                return Some(p);
            }
        }
    }
    exe(root.join(".cuda-toolchain/nvidia/cu13/bin/nvcc"))
}

#[allow(dead_code)] // each build script reads the fields it needs
struct KernelReport {
    name: String,
    arch: String,
    regs: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Reads ptxas' `-v` lines: "Compiling entry function 'X' for 'sm_90a'", then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads", then
/// "Used N registers, ..., N bytes smem, ...".
fn parse_ptxas(log: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    let num_before = |line: &str, what: &str| -> u32 {
        line.find(what)
            .and_then(|i| line[..i].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty()))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest.split("for '").nth(1).and_then(|a| a.split('\'').next()).unwrap_or("").to_string();
            out.push(KernelReport { name, arch, regs: 0, smem: 0, stack: 0, spill_stores: 0, spill_loads: 0 });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack = num_before(line, "bytes stack frame");
                r.spill_stores = num_before(line, "bytes spill stores");
                r.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.regs = num_before(line, "registers");
                r.smem = num_before(line, "bytes smem");
            }
        }
    }
    out
}
