//! A shaped, shared device buffer.
use crate::backend::Backend;
use std::sync::Arc;

pub struct Tensor<B: Backend> {
    pub buf: Arc<B::Buf>,
    pub shape: Vec<usize>,
}

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor { buf: self.buf.clone(), shape: self.shape.clone() }
    }
}

impl<B: Backend> Tensor<B> {
    pub fn new(buf: B::Buf, shape: &[usize]) -> Self {
        Tensor { buf: Arc::new(buf), shape: shape.to_vec() }
    }
    pub fn from_host(backend: &B, data: &[f32], shape: &[usize]) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "tensor data does not match shape {shape:?}");
        Self::new(backend.upload(data), shape)
    }
    pub fn zeros(backend: &B, shape: &[usize]) -> Self {
        Self::new(backend.zeros(shape.iter().product()), shape)
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    #[track_caller]
    pub fn to_host(&self, backend: &B) -> Vec<f32> {
        backend.download(&self.buf)
    }
    /// Size of the last dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
    /// Product of all dimensions but the last.
    pub fn rows(&self) -> usize {
        self.numel() / self.cols().max(1)
    }
    /// The buffer for in-place updates (copies it first if it is shared).
    pub fn buf_mut(&mut self) -> &mut B::Buf {
        Arc::make_mut(&mut self.buf)
    }
}
