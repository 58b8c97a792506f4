//! Element types and reductions. Half-precision types (f16, bf16) are reduced in f32: a
//! collective widens them once at the start and narrows the result once at the end, so sums
//! do not lose precision at every hop, and every rank rounds the same f32 values.

use half::{bf16, f16};

/// An element type on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    /// 32-bit float.
    F32 = 1,
    /// 64-bit float.
    F64 = 2,
    /// IEEE half.
    F16 = 3,
    /// bfloat16.
    BF16 = 4,
    /// 32-bit signed integer.
    I32 = 5,
    /// 64-bit signed integer.
    I64 = 6,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// How values are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReduceOp {
    /// Sum.
    Sum = 1,
    /// Mean over the ranks (integer division for integers).
    Avg = 2,
    /// Minimum.
    Min = 3,
    /// Maximum.
    Max = 4,
}

/// A type collectives carry.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// Its wire type.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

/// Numbers reductions work on (halves are widened to f32 first).
trait Reducible: bytemuck::Pod {
    fn combine(self, other: Self, op: ReduceOp) -> Self;
    fn divide(self, by: usize) -> Self;
}

macro_rules! float_reducible {
    ($t:ty) => {
        impl Reducible for $t {
            fn combine(self, other: Self, op: ReduceOp) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => self + other,
                    ReduceOp::Min => self.min(other),
                    ReduceOp::Max => self.max(other),
                }
            }
            fn divide(self, by: usize) -> Self {
                self / by as $t
            }
        }
    };
}

macro_rules! int_reducible {
    ($t:ty) => {
        impl Reducible for $t {
            fn combine(self, other: Self, op: ReduceOp) -> Self {
                match op {
                    // Wrapping, as integer all-reduces do everywhere (no panic on overflow).
                    ReduceOp::Sum | ReduceOp::Avg => self.wrapping_add(other),
                    ReduceOp::Min => self.min(other),
                    ReduceOp::Max => self.max(other),
                }
            }
            fn divide(self, by: usize) -> Self {
                self / (by as $t)
            }
        }
    };
}

float_reducible!(f32);
float_reducible!(f64);
int_reducible!(i32);
int_reducible!(i64);

fn combine_typed<T: Reducible>(acc: &mut [u8], src: &[u8], op: ReduceOp) {
    // Working buffers are 8-byte aligned; a received buffer may not be, so it is read
    // element by element then.
    let acc: &mut [T] = bytemuck::cast_slice_mut(acc);
    match bytemuck::try_cast_slice::<u8, T>(src) {
        Ok(src) => {
            for (a, b) in acc.iter_mut().zip(src) {
                *a = a.combine(*b, op);
            }
        }
        Err(_) => {
            for (a, b) in acc
                .iter_mut()
                .zip(src.chunks_exact(std::mem::size_of::<T>()))
            {
                *a = a.combine(bytemuck::pod_read_unaligned(b), op);
            }
        }
    }
}

/// The type a collective computes in for `dtype` (halves widen to f32).
pub fn compute_type(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `acc[i] = acc[i] op src[i]` on byte buffers of `dtype` (a compute type: not a half).
/// `acc` must be aligned for `dtype`.
pub fn combine(dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) {
    match dtype {
        DType::F32 => combine_typed::<f32>(acc, src, op),
        DType::F64 => combine_typed::<f64>(acc, src, op),
        DType::I32 => combine_typed::<i32>(acc, src, op),
        DType::I64 => combine_typed::<i64>(acc, src, op),
        DType::F16 | DType::BF16 => unreachable!("halves are reduced as f32"),
    }
}

/// Divides every element by `ranks` (the end of an average).
pub fn divide(dtype: DType, data: &mut [u8], ranks: usize) {
    fn typed<T: Reducible>(data: &mut [u8], ranks: usize) {
        for value in bytemuck::cast_slice_mut::<u8, T>(data) {
            *value = value.divide(ranks);
        }
    }
    match dtype {
        DType::F32 => typed::<f32>(data, ranks),
        DType::F64 => typed::<f64>(data, ranks),
        DType::I32 => typed::<i32>(data, ranks),
        DType::I64 => typed::<i64>(data, ranks),
        DType::F16 | DType::BF16 => unreachable!("halves are reduced as f32"),
    }
}

/// An 8-byte-aligned byte buffer (so that it can be viewed as any element type).
#[derive(Debug, Clone, Default)]
pub struct Buffer {
    words: Vec<u64>,
    len: usize,
}

impl Buffer {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Buffer {
        Buffer {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// Makes it `len` bytes long, keeping its memory when it is large enough (new bytes are
    /// unspecified).
    pub fn resize(&mut self, len: usize) {
        self.words.resize(len.div_ceil(8), 0);
        self.len = len;
    }

    /// A copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Buffer {
        let mut buffer = Buffer::zeroed(bytes.len());
        buffer.bytes_mut().copy_from_slice(bytes);
        buffer
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// Its bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }

    /// Bytes it can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.words.capacity() * 8
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The working buffer of a collective over `data`: its bytes, halves widened to f32.
pub fn widen<T: Element>(data: &[T]) -> Buffer {
    let mut buffer = Buffer::default();
    widen_into(data, &mut buffer);
    buffer
}

/// [`widen`] into `buffer`, reusing its memory (large buffers allocated afresh on every call
/// would fault their pages in again every time).
pub fn widen_into<T: Element>(data: &[T], buffer: &mut Buffer) {
    match T::DTYPE {
        DType::F16 | DType::BF16 => {
            buffer.resize(data.len() * 4);
            let wide: &mut [f32] = bytemuck::cast_slice_mut(buffer.bytes_mut());
            let bits: &[u16] = bytemuck::cast_slice(data);
            for (w, b) in wide.iter_mut().zip(bits) {
                *w = if T::DTYPE == DType::F16 {
                    f16::from_bits(*b).to_f32()
                } else {
                    bf16::from_bits(*b).to_f32()
                };
            }
        }
        _ => {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            buffer.resize(bytes.len());
            buffer.bytes_mut().copy_from_slice(bytes);
        }
    }
}

/// Writes a working buffer back into `data` (narrowing halves).
pub fn narrow<T: Element>(buffer: &Buffer, data: &mut [T]) {
    match T::DTYPE {
        DType::F16 | DType::BF16 => {
            let wide: &[f32] = bytemuck::cast_slice(buffer.bytes());
            let out: &mut [u16] = bytemuck::cast_slice_mut(data);
            for (o, w) in out.iter_mut().zip(wide) {
                *o = if T::DTYPE == DType::F16 {
                    f16::from_f32(*w).to_bits()
                } else {
                    bf16::from_f32(*w).to_bits()
                };
            }
        }
        _ => bytemuck::cast_slice_mut::<T, u8>(data).copy_from_slice(buffer.bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_by_type_and_op() {
        let mut acc = Buffer::from_bytes(bytemuck::cast_slice(&[1.0f32, 5.0, -2.0]));
        let src: Vec<u8> = bytemuck::cast_slice(&[2.0f32, 3.0, -7.0]).to_vec();
        combine(DType::F32, ReduceOp::Max, acc.bytes_mut(), &src);
        assert_eq!(
            bytemuck::cast_slice::<u8, f32>(acc.bytes()),
            &[2.0, 5.0, -2.0]
        );
        let mut ints = Buffer::from_bytes(bytemuck::cast_slice(&[i64::MAX, 10]));
        combine(
            DType::I64,
            ReduceOp::Sum,
            ints.bytes_mut(),
            bytemuck::cast_slice(&[1i64, 5]),
        );
        assert_eq!(
            bytemuck::cast_slice::<u8, i64>(ints.bytes()),
            &[i64::MIN, 15]
        );
        divide(DType::I64, ints.bytes_mut(), 5);
        assert_eq!(bytemuck::cast_slice::<u8, i64>(ints.bytes())[1], 3);
        // An unaligned source is read element by element.
        let mut padded = vec![0u8; 1];
        padded.extend_from_slice(bytemuck::cast_slice(&[1i32, 2]));
        let mut acc = Buffer::from_bytes(bytemuck::cast_slice(&[10i32, 20]));
        combine(DType::I32, ReduceOp::Min, acc.bytes_mut(), &padded[1..]);
        assert_eq!(bytemuck::cast_slice::<u8, i32>(acc.bytes()), &[1, 2]);
    }

    #[test]
    fn halves_round_trip_through_f32() {
        let data = [f16::from_f32(1.5), f16::from_f32(-0.25)];
        let wide = widen(&data);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(wide.bytes()), &[1.5, -0.25]);
        let mut back = [f16::ZERO; 2];
        narrow(&wide, &mut back);
        assert_eq!(back, data);
        let data = [bf16::from_f32(3.0)];
        let mut back = [bf16::ZERO];
        narrow(&widen(&data), &mut back);
        assert_eq!(back, data);
    }
}
