//! A minimal reverse-mode tape. Each operator records one node: the ids of its inputs and a
//! closure that maps the gradient of its output to the gradients of its inputs, holding exactly
//! the tensors it needs (as shared buffers). `backward` walks the nodes in reverse order.
//!
//! [`Graph::checkpoint`] runs a sub-computation (a decoder layer) without recording it, keeps only
//! its inputs, and re-runs it on a private tape during the backward: the same operators in the same
//! order, so on the CPU its gradients are bit-identical to the recorded path.
use crate::backend::{AttnShape, Backend, StepLoss};
use crate::tensor::Tensor;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// A value in a graph: a tensor and the id gradients are keyed by.
pub struct Var<B: Backend> {
    pub id: usize,
    pub value: Tensor<B>,
}

impl<B: Backend> Clone for Var<B> {
    fn clone(&self) -> Self {
        Var { id: self.id, value: self.value.clone() }
    }
}

type BackwardFn<B> = Box<dyn FnOnce(&B, <B as Backend>::Buf) -> Vec<Option<<B as Backend>::Buf>>>;

struct Node<B: Backend> {
    output: usize,
    inputs: Vec<usize>,
    backward: BackwardFn<B>,
}

struct Tape<B: Backend> {
    nodes: Vec<Node<B>>,
    next_id: usize,
    /// Variables whose backward would download its gradient to learn a scalar seed: the cell
    /// gets the seed's value when a backward starts from them with the value known on the host.
    host_seeds: Vec<(usize, Rc<Cell<Option<f64>>>)>,
}

pub struct Graph<'b, B: Backend> {
    backend: &'b B,
    /// When false (inference, or the forward of a checkpointed block) nothing is recorded.
    record: bool,
    tape: RefCell<Tape<B>>,
}

/// Gradients by variable id.
pub struct Grads<B: Backend> {
    map: HashMap<usize, B::Buf>,
}

impl<B: Backend> Grads<B> {
    pub fn take(&mut self, v: &Var<B>) -> Option<B::Buf> {
        self.map.remove(&v.id)
    }
    pub fn get(&self, v: &Var<B>) -> Option<&B::Buf> {
        self.map.get(&v.id)
    }
}

impl<'b, B: Backend> Graph<'b, B> {
    /// A graph that records operators for a backward pass.
    pub fn new(backend: &'b B) -> Self {
        Graph {
            backend,
            record: true,
            tape: RefCell::new(Tape { nodes: Vec::new(), next_id: 0, host_seeds: Vec::new() }),
        }
    }

    /// A graph that records nothing (inference).
    pub fn inference(backend: &'b B) -> Self {
        Graph { record: false, ..Self::new(backend) }
    }

    pub fn backend(&self) -> &'b B {
        self.backend
    }

    fn new_id(&self) -> usize {
        let mut t = self.tape.borrow_mut();
        t.next_id += 1;
        t.next_id - 1
    }

    /// A leaf: a parameter or an input whose gradient may be asked for.
    pub fn leaf(&self, value: Tensor<B>) -> Var<B> {
        Var { id: self.new_id(), value }
    }

    /// Records an operator's output and its backward.
    fn push(
        &self,
        value: Tensor<B>,
        inputs: &[&Var<B>],
        backward: impl FnOnce(&B, B::Buf) -> Vec<Option<B::Buf>> + 'static,
    ) -> Var<B> {
        let out = self.leaf(value);
        if self.record {
            self.tape.borrow_mut().nodes.push(Node {
                output: out.id,
                inputs: inputs.iter().map(|v| v.id).collect(),
                backward: Box::new(backward),
            });
        }
        out
    }

    /// Runs the tape backwards from `output` with `seed` as its gradient. Consumes the tape.
    pub fn backward(&self, output: &Var<B>, seed: B::Buf) -> Grads<B> {
        self.backward_streaming(output, seed, &[], &mut |_, _| {})
    }

    /// [`Graph::backward_streaming`] from a one-element `output` whose seed `seed` is known on the
    /// host: an operator that needs the seed's value reads it from there instead of downloading
    /// it (no host sync).
    pub fn backward_streaming_from_scalar(
        &self,
        output: &Var<B>,
        seed: f64,
        watch: &[&Var<B>],
        ready: &mut dyn FnMut(usize, B::Buf),
    ) -> Grads<B> {
        let seed = seed as f32;
        for (_, cell) in self.tape.borrow().host_seeds.iter().filter(|(id, _)| *id == output.id) {
            cell.set(Some(seed as f64));
        }
        self.backward_streaming(output, self.backend.upload(&[seed]), watch, ready)
    }

    /// Like [`Graph::backward`], but hands each variable of `watch` to `ready` (with its index in
    /// `watch`) as soon as its gradient is final — right after the backward of the first operator
    /// that used it — so a caller can start reducing a layer's gradients while earlier layers are
    /// still being differentiated. Watched variables no operator used get zeros, at the end.
    /// Their gradients are not in the returned [`Grads`].
    pub fn backward_streaming(
        &self,
        output: &Var<B>,
        seed: B::Buf,
        watch: &[&Var<B>],
        ready: &mut dyn FnMut(usize, B::Buf),
    ) -> Grads<B> {
        let nodes = std::mem::take(&mut self.tape.borrow_mut().nodes);
        // For each node, the watched variables whose first use it is.
        let watched: HashMap<usize, usize> = watch.iter().enumerate().map(|(i, v)| (v.id, i)).collect();
        let mut first_use: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
        let mut seen = vec![false; watch.len()];
        for (n, node) in nodes.iter().enumerate() {
            for id in &node.inputs {
                if let Some(&w) = watched.get(id) {
                    if !seen[w] {
                        seen[w] = true;
                        first_use[n].push(w);
                    }
                }
            }
        }
        let mut map: HashMap<usize, B::Buf> = HashMap::new();
        map.insert(output.id, seed);
        for (n, node) in nodes.into_iter().enumerate().rev() {
            if let Some(g) = map.remove(&node.output) {
                let input_grads = (node.backward)(self.backend, g);
                debug_assert_eq!(input_grads.len(), node.inputs.len());
                for (id, grad) in node.inputs.into_iter().zip(input_grads) {
                    let Some(grad) = grad else { continue };
                    match map.get_mut(&id) {
                        Some(acc) => self.backend.add_assign(acc, &grad),
                        None => {
                            map.insert(id, grad);
                        }
                    }
                }
            }
            for &w in &first_use[n] {
                let v = watch[w];
                ready(w, map.remove(&v.id).unwrap_or_else(|| self.backend.zeros(v.value.numel())));
            }
        }
        for (w, v) in watch.iter().enumerate().filter(|(w, _)| !seen[*w]) {
            ready(w, map.remove(&v.id).unwrap_or_else(|| self.backend.zeros(v.value.numel())));
        }
        Grads { map }
    }

    pub fn add(&self, a: &Var<B>, b: &Var<B>) -> Var<B> {
        assert_eq!(a.value.shape, b.value.shape, "add: shapes differ");
        let y = self.backend.add(&a.value.buf, &b.value.buf);
        self.push_add(y, a, b)
    }

    /// Records `y = a + b` (computed by the caller).
    fn push_add(&self, y: B::Buf, a: &Var<B>, b: &Var<B>) -> Var<B> {
        self.push(Tensor::new(y, &a.value.shape), &[a, b], |_, g| vec![Some(g.clone()), Some(g)])
    }

    /// `x[m,k]·w[n,k]ᵀ`.
    pub fn linear(&self, x: &Var<B>, w: &Var<B>) -> Var<B> {
        let (m, k) = (x.value.rows(), x.value.cols());
        let n = w.value.shape[0];
        assert_eq!(w.value.cols(), k, "linear: input has {k} features, weight {:?}", w.value.shape);
        let y = self.backend.linear(&x.value.buf, &w.value.buf, m, k, n);
        let (xs, ws) = (x.value.buf.clone(), w.value.buf.clone());
        self.push(Tensor::new(y, &[m, n]), &[x, w], move |be, g| {
            let (dx, dw) = be.linear_backward_new_dw(&g, &xs, &ws, m, k, n);
            vec![Some(dx), Some(dw)]
        })
    }

    pub fn embedding(&self, table: &Var<B>, ids: Arc<Vec<u32>>) -> Var<B> {
        let dim = table.value.cols();
        let rows = table.value.rows();
        let y = self.backend.embedding(&table.value.buf, &ids, dim);
        self.push(Tensor::new(y, &[ids.len(), dim]), &[table], move |be, g| {
            let mut dt = be.zeros(rows * dim);
            be.embedding_backward(&g, &ids, dim, &mut dt);
            vec![Some(dt)]
        })
    }

    pub fn rmsnorm(&self, x: &Var<B>, w: &Var<B>, eps: f64) -> Var<B> {
        let (y, rstd) = self.backend.rmsnorm(&x.value.buf, &w.value.buf, x.value.cols(), eps);
        self.push_rmsnorm(y, rstd, x, w)
    }

    /// Records `(y, rstd) = rmsnorm(x, w)` (computed by the caller).
    fn push_rmsnorm(&self, y: B::Buf, rstd: B::Buf, x: &Var<B>, w: &Var<B>) -> Var<B> {
        let dim = x.value.cols();
        let (xs, ws) = (x.value.buf.clone(), w.value.buf.clone());
        self.push(Tensor::new(y, &x.value.shape), &[x, w], move |be, g| {
            let mut dw = be.zeros(dim);
            let dx = be.rmsnorm_backward(&g, &xs, &ws, &rstd, dim, &mut dw);
            vec![Some(dx), Some(dw)]
        })
    }

    /// `h = x + r` and `rmsnorm(h, w)` in one fused pass ([`Backend::add_rmsnorm`]); returns
    /// `(h, norm)`, recorded as the add and the norm they replace (same backward).
    pub fn add_rmsnorm(&self, x: &Var<B>, r: &Var<B>, w: &Var<B>, eps: f64) -> (Var<B>, Var<B>) {
        assert_eq!(x.value.shape, r.value.shape, "add_rmsnorm: shapes differ");
        let (h, y, rstd) = self.backend.add_rmsnorm(&x.value.buf, &r.value.buf, &w.value.buf, x.value.cols(), eps);
        let h = self.push_add(h, x, r);
        let n = self.push_rmsnorm(y, rstd, &h, w);
        (h, n)
    }

    /// RoPE on `[tokens, heads·head_dim]`.
    pub fn rope(&self, x: &Var<B>, positions: Arc<Vec<u32>>, heads: usize, head_dim: usize, theta: f64) -> Var<B> {
        let y = self.backend.rope(&x.value.buf, &positions, heads, head_dim, theta, false);
        self.push(Tensor::new(y, &x.value.shape), &[x], move |be, g| {
            vec![Some(be.rope(&g, &positions, heads, head_dim, theta, true))]
        })
    }

    pub fn attention(&self, q: &Var<B>, k: &Var<B>, v: &Var<B>, cu_seqlens: Arc<Vec<u32>>, shape: AttnShape) -> Var<B> {
        let (out, lse) = self.backend.attention(&q.value.buf, &k.value.buf, &v.value.buf, &cu_seqlens, shape);
        let out = Arc::new(out);
        let (qs, ks, vs, os) = (q.value.buf.clone(), k.value.buf.clone(), v.value.buf.clone(), out.clone());
        let result = Tensor { buf: out, shape: q.value.shape.clone() };
        self.push(result, &[q, k, v], move |be, g| {
            let (dq, dk, dv) = be.attention_backward(&g, &qs, &ks, &vs, &os, &lse, &cu_seqlens, shape);
            vec![Some(dq), Some(dk), Some(dv)]
        })
    }

    /// Attention of new queries against cached keys/values (inference only: records nothing).
    pub fn attention_decode(&self, q: &Var<B>, k_all: &B::Buf, v_all: &B::Buf, shape: AttnShape) -> Var<B> {
        assert!(!self.record, "attention_decode has no backward; use an inference graph");
        let out = self.backend.attention_decode(&q.value.buf, k_all, v_all, shape);
        self.leaf(Tensor::new(out, &q.value.shape))
    }

    pub fn swiglu(&self, gate: &Var<B>, up: &Var<B>) -> Var<B> {
        let y = self.backend.swiglu(&gate.value.buf, &up.value.buf);
        let (gs, us) = (gate.value.buf.clone(), up.value.buf.clone());
        self.push(Tensor::new(y, &gate.value.shape), &[gate, up], move |be, g| {
            let (dg, du) = be.swiglu_backward(&g, &gs, &us);
            vec![Some(dg), Some(du)]
        })
    }

    /// Mean cross-entropy of `logits` (`[tokens, vocab]`) against `targets`; returns the loss as a
    /// one-element variable (the backward seed multiplies the gradient) and as f64.
    pub fn cross_entropy(&self, logits: &Var<B>, targets: Arc<Vec<i32>>) -> (Var<B>, f64) {
        let vocab = logits.value.cols();
        let (loss, lse) = self.backend.cross_entropy(&logits.value.buf, &targets, vocab);
        let ls = logits.value.buf.clone();
        let out = self.push(Tensor::new(self.backend.upload(&[loss as f32]), &[1]), &[logits], move |be, g| {
            let dloss = be.download(&g)[0] as f64;
            vec![Some(be.cross_entropy_backward(&ls, &lse, &targets, vocab, dloss))]
        });
        (out, loss)
    }

    /// [`Graph::cross_entropy`] for training, where the backward's seed `dloss` is known now: the
    /// backend computes the logits' gradient in the forward pass (one pass over the vocabulary,
    /// and the logits need not be kept for the backward). A backward reached with another seed
    /// rescales that gradient.
    ///
    /// The loss may still be on the device ([`Backend::cross_entropy_with_grad_deferred`]); the
    /// returned variable then holds each row's loss, and only its gradient matters.
    pub fn cross_entropy_seeded(&self, logits: &Var<B>, targets: &[i32], dloss: f64) -> (Var<B>, StepLoss<B::Buf>) {
        let vocab = logits.value.cols();
        // The seed travels as an f32 buffer: compute with the value the backward will receive.
        let dloss = dloss as f32 as f64;
        let (loss, dlogits) = self.backend.cross_entropy_with_grad_deferred(&logits.value.buf, targets, vocab, dloss);
        let value = match &loss {
            StepLoss::Host(mean) => Tensor::new(self.backend.upload(&[*mean as f32]), &[1]),
            StepLoss::Rows { rows, .. } => Tensor::new(rows.clone(), &[targets.len()]),
        };
        let known = Rc::new(Cell::new(None));
        let seed_on_host = known.clone();
        let out = self.push(value, &[logits], move |be, g| {
            let mut dlogits = dlogits;
            let seed = seed_on_host.get().unwrap_or_else(|| be.download(&g)[0] as f64);
            if seed != dloss {
                assert!(
                    dloss != 0.0,
                    "cross_entropy_seeded: the gradient was computed for a seed of 0, the backward got {seed}"
                );
                be.scale_assign(&mut dlogits, (seed / dloss) as f32);
            }
            vec![Some(dlogits)]
        });
        if self.record {
            self.tape.borrow_mut().host_seeds.push((out.id, known));
        }
        (out, loss)
    }

    /// Runs `f` on `inputs` without keeping its intermediate activations; the backward re-runs it.
    /// `f` must be a pure function of its inputs (parameters included), as a decoder layer is.
    pub fn checkpoint(&self, inputs: &[&Var<B>], f: impl Fn(&Graph<B>, &[Var<B>]) -> Var<B> + 'static) -> Var<B> {
        let values: Vec<Tensor<B>> = inputs.iter().map(|v| v.value.clone()).collect();
        let out = {
            let quiet = Graph::inference(self.backend);
            let leaves: Vec<Var<B>> = values.iter().map(|t| quiet.leaf(t.clone())).collect();
            f(&quiet, &leaves).value
        };
        self.push(out, inputs, move |be, g| {
            let sub = Graph::new(be);
            let leaves: Vec<Var<B>> = values.into_iter().map(|t| sub.leaf(t)).collect();
            let out = f(&sub, &leaves);
            let mut grads = sub.backward(&out, g);
            leaves.iter().map(|l| grads.take(l)).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;

    #[test]
    fn shared_input_gradients_accumulate() {
        // y = sum((x + x) * w) through linear: dy/dx = 2 w.
        let be = Cpu;
        let g = Graph::new(&be);
        let x = g.leaf(Tensor::from_host(&be, &[1.0, 2.0], &[1, 2]));
        let w = g.leaf(Tensor::from_host(&be, &[3.0, 4.0], &[1, 2]));
        let s = g.add(&x, &x);
        let y = g.linear(&s, &w);
        let mut grads = g.backward(&y, vec![1.0]);
        assert_eq!(grads.take(&x).unwrap(), vec![6.0, 8.0]);
        assert_eq!(grads.take(&w).unwrap(), vec![2.0, 4.0]);
    }

    #[test]
    fn inference_graph_records_nothing() {
        let be = Cpu;
        let g = Graph::inference(&be);
        let x = g.leaf(Tensor::from_host(&be, &[1.0], &[1, 1]));
        let _ = g.add(&x, &x);
        assert!(g.tape.borrow().nodes.is_empty());
    }
}
