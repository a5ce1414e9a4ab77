//! The emulated card (`LLAMA_CPT_EMU_DEVICE`): its attributes and the limits launches are held to.
use cudarc::driver::sys::{cudaError_enum as CUresult, CUdevice_attribute as DevAttr};
use std::sync::OnceLock;

/// The emulated card: what `cuDeviceGetAttribute` reports and the launch limits enforce.
#[derive(Debug, Clone)]
pub struct Card {
    pub name: &'static str,
    pub cc: (i32, i32),
    pub sm_count: i32,
    pub total_mem: usize,
    /// Dynamic + static shared memory a block may have after opting in (cuFuncSetAttribute).
    pub smem_optin_per_block: i32,
    pub smem_per_sm: i32,
    pub l2_bytes: i32,
    pub clock_khz: i32,
    pub mem_clock_khz: i32,
    pub bus_width: i32,
}

/// Shared memory a block may use without opting in (every architecture since Fermi).
pub const SMEM_DEFAULT_PER_BLOCK: i32 = 48 * 1024;
/// 32-bit registers per block and per SM (sm_80 and sm_90).
pub const REGS_PER_BLOCK: i32 = 64 * 1024;
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub(super) const MAX_BLOCK_DIM: [u32; 3] = [1024, 1024, 64];
pub(super) const MAX_GRID_DIM: [u32; 3] = [i32::MAX as u32, 65_535, 65_535];

impl Card {
    pub fn h100() -> Card {
        Card {
            name: "NVIDIA H100 80GB HBM3 (emulated)",
            cc: (9, 0),
            sm_count: 132,
            total_mem: 80 << 30,
            smem_optin_per_block: 227 * 1024,
            smem_per_sm: 228 * 1024,
            l2_bytes: 50 << 20,
            clock_khz: 1_980_000,
            mem_clock_khz: 2_619_000,
            bus_width: 5120,
        }
    }
    pub fn a100() -> Card {
        Card {
            name: "NVIDIA A100-SXM4-80GB (emulated)",
            cc: (8, 0),
            sm_count: 108,
            total_mem: 80 << 30,
            smem_optin_per_block: 163 * 1024,
            smem_per_sm: 164 * 1024,
            l2_bytes: 40 << 20,
            clock_khz: 1_410_000,
            mem_clock_khz: 1_593_000,
            bus_width: 5120,
        }
    }
    /// The card `LLAMA_CPT_EMU_DEVICE` names (`h100` when unset). An unknown name is a
    /// configuration error: reported once, and `cuInit` fails.
    /// `LLAMA_CPT_EMU_MEMORY_GIB=N` gives it N GiB instead (to measure in the shapes mode a job that
    /// does not fit the real card).
    fn from_env() -> Result<Card, String> {
        let mut card = match std::env::var("LLAMA_CPT_EMU_DEVICE").as_deref() {
            Err(_) | Ok("") | Ok("h100") => Card::h100(),
            Ok("a100") => Card::a100(),
            Ok(other) => return Err(format!("LLAMA_CPT_EMU_DEVICE={other}: unknown emulated card (h100 or a100)")),
        };
        if let Ok(v) = std::env::var("LLAMA_CPT_EMU_MEMORY_GIB") {
            let gib: usize = v
                .trim()
                .parse()
                .ok()
                .filter(|&g| g > 0)
                .ok_or(format!("LLAMA_CPT_EMU_MEMORY_GIB={v}: not a positive whole number"))?;
            card.total_mem = gib << 30;
        }
        Ok(card)
    }
    /// The `sm` number ptxas' register counts are keyed by (80, 90).
    pub fn sm(&self) -> u32 {
        (self.cc.0 * 10 + self.cc.1) as u32
    }
    pub(super) fn attribute(&self, a: DevAttr) -> Option<i32> {
        use DevAttr::*;
        Some(match a {
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR => self.cc.0,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR => self.cc.1,
            CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT => self.sm_count,
            CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK => MAX_THREADS_PER_BLOCK as i32,
            CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X => MAX_BLOCK_DIM[0] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y => MAX_BLOCK_DIM[1] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z => MAX_BLOCK_DIM[2] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X => MAX_GRID_DIM[0] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y => MAX_GRID_DIM[1] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z => MAX_GRID_DIM[2] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK => SMEM_DEFAULT_PER_BLOCK,
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN => self.smem_optin_per_block,
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR => self.smem_per_sm,
            CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK | CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR => {
                REGS_PER_BLOCK
            }
            CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR => 2048,
            CU_DEVICE_ATTRIBUTE_WARP_SIZE => 32,
            CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY => 64 * 1024,
            CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE => self.l2_bytes,
            CU_DEVICE_ATTRIBUTE_CLOCK_RATE => self.clock_khz,
            CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE => self.mem_clock_khz,
            CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH => self.bus_width,
            CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED
            | CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING
            | CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS
            | CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY => 1,
            CU_DEVICE_ATTRIBUTE_INTEGRATED
            | CU_DEVICE_ATTRIBUTE_TCC_DRIVER
            | CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT
            | CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID
            | CU_DEVICE_ATTRIBUTE_PCI_BUS_ID
            | CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID => 0,
            _ => return None,
        })
    }
}

/// The card, read once from the environment.
pub fn card() -> Result<&'static Card, CUresult> {
    static CARD: OnceLock<Result<Card, String>> = OnceLock::new();
    match CARD.get_or_init(|| {
        let c = Card::from_env();
        if let Err(msg) = &c {
            eprintln!("emulated CUDA: {msg}");
        }
        c
    }) {
        Ok(c) => Ok(c),
        Err(_) => Err(CUresult::CUDA_ERROR_INVALID_DEVICE),
    }
}
