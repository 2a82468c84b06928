//! Loss and parameter gradients in one call, optionally with layer-granular activation
//! recompute (HF's `gradient_checkpointing`).
//!
//! Plain: one forward recording the whole graph, then `backward`: every layer's activations stay
//! alive until backward, memory ~ layers × activations of one layer.
//!
//! Recompute: the decoder layers run forward and their outputs are detached, so each layer's
//! graph is freed at once and only its input x_l ([b, t, hidden]) is kept. The head and the loss
//! run with a graph on top of x_L as a fresh variable; backward gives dL/dx_L. Then, from the
//! last layer to the first, layer l runs again on x_l as a fresh variable and
//! `backward(sum(f_l(x_l) ⊙ dL/dx_{l+1}))` gives, by the chain rule, the layer's parameter
//! gradients and dL/dx_l. Finally the same surrogate through the embedding gives its gradient.
//! Memory ~ layers × [b, t, hidden] + one layer's activations, at the cost of one more forward of
//! every layer. Gradients equal the plain path's up to float summation order.

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
        let mut grads = vec![None; self.trainable().len()];
        if !recompute {
            let x = self.net.layers_forward(input_ids, layout)?;
            let (value, extra) = loss(&Top {
                net: &self.net,
                x: &x,
            })?;
            self.accumulate(&mut grads, &value.backward()?)?;
            return Ok((value.detach(), extra, grads));
        }

        let net = &self.net;
        let pos = net.positions(input_ids, layout)?;
        let embedded = net.embed(input_ids)?; // [b, t, hidden], graph only to embed_tokens

        // Forward without keeping activations: only each layer's input survives.
        let mut inputs = Vec::with_capacity(net.layers.len());
        let mut x = embedded.detach();
        for layer in &net.layers {
            let out = layer.forward(&x, &pos, None)?.detach();
            inputs.push(x);
            x = out;
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let (value, extra) = loss(&Top {
            net,
            x: top.as_tensor(),
        })?;
        let store = value.backward()?;
        self.accumulate(&mut grads, &store)?;
        let Some(mut grad_out) = store.get(top.as_tensor()).map(Tensor::detach) else {
            return Ok((value.detach(), extra, grads)); // the loss does not depend on the layers
        };
        drop(store);

        for (layer, input) in net.layers.iter().zip(inputs).rev() {
            let input = Var::from_tensor(&input)?;
            let out = layer.forward(input.as_tensor(), &pos, None)?; // recomputed, with graph
            let store = (out * &grad_out)?.sum_all()?.backward()?;
            self.accumulate(&mut grads, &store)?;
            grad_out = match store.get(input.as_tensor()) {
                Some(g) => g.detach(),
                None => grad_out.zeros_like()?,
            };
        }
        if embedded.track_op() {
            let store = (embedded * &grad_out)?.sum_all()?.backward()?;
            self.accumulate(&mut grads, &store)?;
        }
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
