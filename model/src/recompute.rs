//! Loss and parameter gradients in one call, optionally with layer-granular activation
//! recompute (HF's `gradient_checkpointing`).
//!
//! Both ways run the backward layer by layer. Each decoder layer runs forward on its input x_l
//! as a fresh variable, and the output's detached copy feeds the next layer. The head and the
//! loss run with a graph on top of x_L as a fresh variable; backward gives dL/dx_L. Then, from
//! the last layer to the first, `backward(sum(f_l(x_l) ⊙ dL/dx_{l+1}))` gives, by the chain rule,
//! the layer's parameter gradients and dL/dx_l (`herd_kernels::pullback` starts that backward
//! without computing the sum). Finally the same surrogate through the
//! embedding gives its gradient.
//!
//! Plain: each layer's graph is kept from its forward and dropped as soon as its backward is
//! done, so activations are freed while the parameter gradients accumulate, as PyTorch frees
//! saved tensors during its backward (one backward over the whole graph would keep every
//! activation alive until the last gradient exists). The layer's output is kept as its two
//! summands, the residual h (which the graph holds anyway) and the MLP's output, and the next
//! layer's input variable is their sum, so nothing more is held than one graph would hold; the
//! price is the sum and its copy per layer. On the fused path not even the MLP's output is
//! held: it is computed without a graph and its backward starts from `swiglu_linear`'s inputs
//! (`MlpGraph::root`).
//!
//! After each stage of the backward (the head, each layer, the embedding) the caller hears which
//! parameters' gradients are now final ([`Llama::loss_and_gradients_with`]): a data-parallel
//! trainer folds them into its flat sum and starts reducing them while the layers below are
//! still in backward, as PyTorch's DDP does with its buckets. Every parameter but the embedding
//! is read by one stage only; the embedding (also the head, when tied) is final at the end.
//!
//! Recompute: only each layer's input is kept; the layer runs forward again, with its graph,
//! just before its backward. Memory ~ layers × [b, t, hidden] + one layer's activations, at the
//! cost of one more forward of every layer. Gradients equal the plain path's up to float
//! summation order.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::layout::Layout;
use crate::llama::Llama;
use crate::net::Net;

/// One gradient per trainable parameter, in `Llama::trainable()` order (None: not reached).
pub type Gradients = Vec<Option<Tensor>>;

/// What a loss sees: the last decoder layer's output x_L [b, t, hidden], before the final norm
/// and the lm_head. A loss that fuses the head (herd-kernels' linear cross-entropy) takes
/// [`Top::normed`] and [`Top::plain_head_weight`]; any other takes [`Top::logits`].
pub struct Top<'a> {
    net: &'a Net,
    x: &'a Tensor,
}

impl Top<'_> {
    /// logits [b, t, vocab] = lm_head(norm(x_L))
    pub fn logits(&self) -> Result<Tensor> {
        self.net.head(self.x)
    }

    /// norm(x_L) [b, t, hidden], the lm_head's input.
    pub fn normed(&self) -> Result<Tensor> {
        self.net.final_norm(self.x)
    }

    /// The lm_head weight [vocab, hidden] when the head is a plain x Wᵀ (no LoRA on it).
    pub fn plain_head_weight(&self) -> Option<&Tensor> {
        self.net.plain_head_weight()
    }
}

impl Llama {
    /// Runs `loss` on the top of the network over input_ids [b, t] (laid out by `layout`, if any)
    /// and returns what it returned with d(loss)/dθ for every trainable parameter. `loss` yields
    /// a scalar tensor with graph and anything else the caller wants back (e.g. a token count).
    pub fn loss_and_gradients<T>(
        &self,
        input_ids: &Tensor,
        layout: Option<&Layout>,
        recompute: bool,
        loss: impl FnOnce(&Top) -> Result<(Tensor, T)>,
    ) -> Result<(Tensor, T, Gradients)> {
        self.loss_and_gradients_with(input_ids, layout, recompute, loss, |_, _| Ok(()))
    }

    /// [`Llama::loss_and_gradients`], calling `on_final(grads, idx)` after each stage of the
    /// backward with the indices (into `trainable()`) whose gradients no later stage changes,
    /// each index once, last layer first. The callee may take those gradients out of `grads`;
    /// what it leaves is returned. Indices that never got a gradient are never named.
    pub fn loss_and_gradients_with<T>(
        &self,
        input_ids: &Tensor,
        layout: Option<&Layout>,
        recompute: bool,
        loss: impl FnOnce(&Top) -> Result<(Tensor, T)>,
        mut on_final: impl FnMut(&mut Gradients, &[usize]) -> Result<()>,
    ) -> Result<(Tensor, T, Gradients)> {
        let mut grads = vec![None; self.trainable().len()];
        let mut finals = Finals::new(self.trainable(), self.net.embed_weight());
        let net = &self.net;
        let pos = net.positions(input_ids, layout)?;
        let embedded = net.embed(input_ids)?; // [b, t, hidden], graph only to embed_tokens

        // Forward layer by layer, each on its input as a fresh variable, keeping the layer's
        // graph and its output's two summands (plain) or nothing more (recompute). The next
        // input is a new variable holding the sum; no node holds the sum itself.
        let mut layers = Vec::with_capacity(net.layers.len());
        let mut input = Var::from_tensor(&embedded.detach())?;
        for layer in &net.layers {
            let (next, parts) = if recompute {
                let out = layer.forward(input.as_tensor(), &pos, None)?;
                (Var::from_tensor(&out.detach())?, None)
            } else {
                let (h, mlp, graph) = layer.forward_parts(input.as_tensor(), &pos, None)?;
                let sum = (h.detach() + mlp)?;
                (Var::from_tensor(&sum)?, Some((h, graph)))
            };
            layers.push((input, parts));
            input = next;
        }
        let top = input;
        let (value, extra) = loss(&Top {
            net,
            x: top.as_tensor(),
        })?;
        let store = value.backward()?;
        self.accumulate(&mut grads, &store)?;
        on_final(&mut grads, &finals.after_stage(&store))?;
        let Some(mut grad_out) = store.get(top.as_tensor()).map(Tensor::detach) else {
            drop(store);
            let rest = finals.rest(&grads);
            on_final(&mut grads, &rest)?;
            return Ok((value.detach(), extra, grads)); // the loss does not depend on the layers
        };
        drop(store);

        // Backward layer by layer from the top; each layer's graph is dropped once its
        // backward is done.
        for (layer, (input, parts)) in net.layers.iter().zip(layers).rev() {
            let (h, mlp) = match parts {
                Some(parts) => parts,
                None => {
                    let (h, _, graph) = layer.forward_parts(input.as_tensor(), &pos, None)?; // recomputed
                    (h, graph)
                }
            };
            // The layer output h + mlp gets grad_out: backward of sum((h + mlp) ⊙ grad_out),
            // without computing it.
            let store = mlp.root(&h, &grad_out)?.backward()?;
            drop((h, mlp));
            self.accumulate(&mut grads, &store)?;
            on_final(&mut grads, &finals.after_stage(&store))?;
            grad_out = match store.get(input.as_tensor()) {
                Some(g) => g.detach(),
                None => grad_out.zeros_like()?,
            };
        }
        if embedded.track_op() {
            let store = (embedded * &grad_out)?.sum_all()?.backward()?;
            self.accumulate(&mut grads, &store)?;
        }
        let rest = finals.rest(&grads);
        on_final(&mut grads, &rest)?;
        Ok((value.detach(), extra, grads))
    }

    /// grads[i] += store[trainable[i]] where present.
    fn accumulate(&self, grads: &mut Gradients, store: &GradStore) -> Result<()> {
        for (slot, (_, var)) in grads.iter_mut().zip(self.trainable()) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g.detach(),
                });
            }
        }
        Ok(())
    }
}

/// Which parameters' gradients are final after a stage of the layer-by-layer backward.
struct Finals<'a> {
    params: &'a [(String, Var)],
    /// The index read by the embedding stage (the embedding, which a tied head shares): final
    /// only at the end.
    embedding: Option<usize>,
    named: Vec<bool>,
}

impl<'a> Finals<'a> {
    fn new(params: &'a [(String, Var)], embed_weight: &Tensor) -> Self {
        let embedding = params
            .iter()
            .position(|(_, v)| v.as_tensor().id() == embed_weight.id());
        Finals {
            params,
            embedding,
            named: vec![false; params.len()],
        }
    }

    /// The indices this stage gave a gradient, not named before, but the embedding's.
    fn after_stage(&mut self, store: &GradStore) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, (_, var)) in self.params.iter().enumerate() {
            if !self.named[i] && Some(i) != self.embedding && store.get(var.as_tensor()).is_some() {
                self.named[i] = true;
                out.push(i);
            }
        }
        out
    }

    /// Every index with a gradient not named yet (the backward is over).
    fn rest(&mut self, grads: &Gradients) -> Vec<usize> {
        let out: Vec<usize> = (0..self.params.len())
            .filter(|&i| !self.named[i] && grads[i].is_some())
            .collect();
        out.iter().for_each(|&i| self.named[i] = true);
        out
    }
}
