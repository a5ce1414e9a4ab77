//! The element types and reductions collectives accept, and the element-wise combine.
use half::{bf16, f16};

/// The element types and reductions collectives accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    I8,
    U8,
    I32,
    U32,
    I64,
    U64,
    F16,
    F32,
    F64,
    Bf16,
}

impl Elem {
    pub(super) fn from_nccl(t: u32) -> Option<Elem> {
        Some(match t {
            0 => Elem::I8,
            1 => Elem::U8,
            2 => Elem::I32,
            3 => Elem::U32,
            4 => Elem::I64,
            5 => Elem::U64,
            6 => Elem::F16,
            7 => Elem::F32,
            8 => Elem::F64,
            9 => Elem::Bf16,
            _ => return None, // fp8: not used by llama-cpt
        })
    }
    pub fn size(self) -> usize {
        match self {
            Elem::I8 | Elem::U8 => 1,
            Elem::F16 | Elem::Bf16 => 2,
            Elem::I32 | Elem::U32 | Elem::F32 => 4,
            Elem::I64 | Elem::U64 | Elem::F64 => 8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Prod,
    Max,
    Min,
}

impl Reduce {
    pub(super) fn from_nccl(op: u32) -> Option<Reduce> {
        Some(match op {
            0 => Reduce::Sum,
            1 => Reduce::Prod,
            2 => Reduce::Max,
            3 => Reduce::Min,
            _ => return None, // avg and user-defined ops: not used by llama-cpt
        })
    }
}

/// Sum and product as NCCL computes them: IEEE for floats, wrapping for integers.
trait Arith: Copy + PartialOrd {
    fn add(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
}

macro_rules! arith {
    (float: $($t:ty),*; int: $($i:ty),*) => {
        $(impl Arith for $t {
            fn add(self, b: Self) -> Self { self + b }
            fn mul(self, b: Self) -> Self { self * b }
        })*
        $(impl Arith for $i {
            fn add(self, b: Self) -> Self { self.wrapping_add(b) }
            fn mul(self, b: Self) -> Self { self.wrapping_mul(b) }
        })*
    };
}
arith!(float: f32, f64; int: i8, u8, i32, u32, i64, u64);

/// `dst[i] = dst[i] ∘ src[i]` for `len` elements of `T`, each step computed in `W` (the type
/// itself, or f32 for the 16-bit floats, rounded back after every step).
///
/// # Safety
/// Both pointers must be valid for `len` elements (element-aligned or not).
unsafe fn combine_as<T: Copy, W: Arith>(
    dst: *mut u8,
    src: *const u8,
    len: usize,
    op: Reduce,
    widen: impl Fn(T) -> W,
    narrow: impl Fn(W) -> T,
) {
    let (d, s) = (dst as *mut T, src as *const T);
    for i in 0..len {
        let (a, b) = (widen(d.add(i).read_unaligned()), widen(s.add(i).read_unaligned()));
        let r = match op {
            Reduce::Sum => a.add(b),
            Reduce::Prod => a.mul(b),
            Reduce::Max => {
                if b > a {
                    b
                } else {
                    a
                }
            }
            Reduce::Min => {
                if b < a {
                    b
                } else {
                    a
                }
            }
        };
        d.add(i).write_unaligned(narrow(r));
    }
}

/// `dst[i] = dst[i] ∘ src[i]` for `len` elements.
///
/// # Safety
/// Both pointers must be valid for `len` elements (element-aligned or not).
pub(super) unsafe fn combine(dst: *mut u8, src: *const u8, len: usize, elem: Elem, op: Reduce) {
    fn id<T>(x: T) -> T {
        x
    }
    match elem {
        Elem::I8 => combine_as::<i8, i8>(dst, src, len, op, id, id),
        Elem::U8 => combine_as::<u8, u8>(dst, src, len, op, id, id),
        Elem::I32 => combine_as::<i32, i32>(dst, src, len, op, id, id),
        Elem::U32 => combine_as::<u32, u32>(dst, src, len, op, id, id),
        Elem::I64 => combine_as::<i64, i64>(dst, src, len, op, id, id),
        Elem::U64 => combine_as::<u64, u64>(dst, src, len, op, id, id),
        Elem::F32 => combine_as::<f32, f32>(dst, src, len, op, id, id),
        Elem::F64 => combine_as::<f64, f64>(dst, src, len, op, id, id),
        // half's conversions round to nearest even, as the device's do.
        Elem::F16 => combine_as::<f16, f32>(dst, src, len, op, f16::to_f32, f16::from_f32),
        Elem::Bf16 => combine_as::<bf16, f32>(dst, src, len, op, bf16::to_f32, bf16::from_f32),
    }
}
