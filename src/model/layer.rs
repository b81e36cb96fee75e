//! One Phi-3 decoder layer: its forward and its hand-written backward, written once over
//! the device primitives of [`crate::kernels::Backend`] (the CPU in f32, a GPU in bf16 /
//! fp16).
//!
//! Why by hand instead of an autograd graph: a graph keeps every intermediate alive and
//! runs each op's backward rule separately (on the CPU it zero-filled and added every
//! stored gradient and kept two cores ~1.6 busy; on a GPU it would keep ~17 MB of
//! activations per token). Here every product is one call that writes or accumulates into
//! its destination — the LoRA term and the residual into the projection's output, the
//! adapter gradients straight into the flat gradient buffer (so micro-batches accumulate
//! for free), the LoRA input gradient into the frozen path's — and the backward keeps only
//! what it needs: the RoPE'd `qkv`, the attention output (and its log-sum-exp on a GPU),
//! the residual after attention, the `gate_up` output and the rank-r LoRA intermediates.
//! The two RMSNorm outputs, the SwiGLU output and the dropout masks are recomputed.
//!
//! ```text
//! x1 = x  + o(attention(rope(qkv(norm₁(x)))))
//! x2 = x1 + down(swiglu(gate_up(norm₂(x1))))
//! proj(h) = h Wᵀ + s · (dropout(h) Aᵀ) Bᵀ
//! ```

use crate::error::Result;
use crate::kernels::{dropout, Backend, Buf, KvCache, Layout, Mat};

/// A projection's adapter: where its A (r, in) and B (out, r) sit in the flat adapter
/// buffers (parameters, their activation-type copy, gradients: the same offsets).
#[derive(Debug, Clone, Copy)]
pub struct LoraSlot {
    pub a_off: usize,
    pub b_off: usize,
    pub r: usize,
    pub scale: f32,
    pub dropout: f32,
}

/// A frozen projection `(out, in)` in the activation type, with its adapter.
pub struct Lin {
    pub w: Buf,
    pub out: usize,
    pub inp: usize,
    pub lora: Option<LoraSlot>,
}

/// A layer's frozen weights.
pub struct LayerW {
    pub input_norm: Buf,
    pub post_norm: Buf,
    pub qkv: Lin,
    pub o: Lin,
    pub gate_up: Lin,
    pub down: Lin,
}

/// What one call of a layer needs besides its input.
pub struct Step<'a> {
    pub be: &'a dyn Backend,
    pub eps: f32,
    /// The flat adapters in the activation type (A and B by [`LoraSlot`] offsets).
    pub lora: &'a Buf,
    pub layer: usize,
    /// The micro-batch's dropout seed (training with `lora_dropout > 0`).
    pub dropout_seed: Option<u64>,
}

/// What the backward reads of its layer's forward.
pub struct Saved {
    qkv: Buf,
    attn: Buf,
    lse: Option<Buf>,
    x1: Buf,
    gu: Buf,
    u: [Option<Buf>; 4],
}

impl Step<'_> {
    /// The dropout key of projection `module` (0..4) in this layer, when dropout applies.
    fn dropout_key(&self, module: usize, l: &LoraSlot) -> Option<u64> {
        match self.dropout_seed {
            Some(seed) if l.dropout > 0.0 => Some(dropout::key(seed, self.layer, module)),
            _ => None,
        }
    }

    /// `y (+)= x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ` for `x` (n, in): into `residual` when given
    /// (which becomes the output), else into new memory. Returns the output and the rank-r
    /// intermediate `u = dropout(x) Aᵀ` the backward needs.
    fn proj(
        &self,
        lin: &Lin,
        module: usize,
        x: &Buf,
        n: usize,
        residual: Option<Buf>,
    ) -> Result<(Buf, Option<Buf>)> {
        let be = self.be;
        let xm = Mat::of(x, n, lin.inp);
        let w = Mat::of(&lin.w, lin.out, lin.inp).t();
        let mut y = match residual {
            Some(mut y) => {
                be.matmul_acc(&mut y, 0, xm, w, 1.0)?;
                y
            }
            None => be.matmul(xm, w, 1.0, be.act())?,
        };
        let Some(l) = &lin.lora else {
            return Ok((y, None));
        };
        let dropped = match self.dropout_key(module, l) {
            Some(key) => Some(be.dropout(x, l.dropout, key)?),
            None => None,
        };
        let xd = dropped.as_ref().unwrap_or(x);
        let a = Mat::at(self.lora, l.a_off, l.r, lin.inp);
        let b = Mat::at(self.lora, l.b_off, lin.out, l.r);
        let u = be.matmul(Mat::of(xd, n, lin.inp), a.t(), 1.0, be.act())?;
        be.matmul_acc(&mut y, 0, Mat::of(&u, n, l.r), b.t(), l.scale)?;
        Ok((y, Some(u)))
    }

    /// For the output gradient `dy` (n, out) of [`Self::proj`] with input `x`: adds the
    /// adapter's gradients into `grads` (flat f32, the slot's offsets) and returns `dx`
    /// when `need_dx`.
    #[allow(clippy::too_many_arguments)]
    fn proj_bwd(
        &self,
        lin: &Lin,
        module: usize,
        x: &Buf,
        dy: &Buf,
        n: usize,
        u: Option<&Buf>,
        need_dx: bool,
        grads: &mut Buf,
    ) -> Result<Option<Buf>> {
        let be = self.be;
        let dym = Mat::of(dy, n, lin.out);
        let mut dx = if need_dx {
            Some(be.matmul(dym, Mat::of(&lin.w, lin.out, lin.inp), 1.0, be.act())?)
        } else {
            None
        };
        let (Some(l), Some(u)) = (&lin.lora, u) else {
            return Ok(dx);
        };
        // y = s · u Bᵀ, u = xd Aᵀ:  dB = s · dyᵀ u,  du = s · dy B,  dA = duᵀ xd,
        // dxd = du A, and dx = dropout(dxd) (the same mask and scale as xd = dropout(x)).
        let a = Mat::at(self.lora, l.a_off, l.r, lin.inp);
        let b = Mat::at(self.lora, l.b_off, lin.out, l.r);
        be.matmul_acc(grads, l.b_off, dym.t(), Mat::of(u, n, l.r), l.scale)?;
        let du = be.matmul(dym, b, l.scale, be.act())?;
        let dum = Mat::of(&du, n, l.r);
        let key = self.dropout_key(module, l);
        let dropped = match key {
            Some(key) => Some(be.dropout(x, l.dropout, key)?),
            None => None,
        };
        let xd = dropped.as_ref().unwrap_or(x);
        be.matmul_acc(grads, l.a_off, dum.t(), Mat::of(xd, n, lin.inp), 1.0)?;
        drop(dropped);
        if let Some(dx) = dx.as_mut() {
            match key {
                None => be.matmul_acc(dx, 0, dum, a, 1.0)?,
                Some(key) => {
                    let dxd = be.matmul(dum, a, 1.0, be.act())?;
                    be.add(dx, &be.dropout(&dxd, l.dropout, key)?)?;
                }
            }
        }
        Ok(dx)
    }
}

impl LayerW {
    /// The layer's output for `x` (n, hidden), and with `keep` what its backward needs.
    /// With `caches` (generation, one per segment) keys and values go to the caches and
    /// queries see everything cached.
    pub fn forward(
        &self,
        s: &Step,
        x: &Buf,
        lay: &Layout,
        caches: Option<&mut [&mut KvCache]>,
        keep: bool,
    ) -> Result<(Buf, Option<Saved>)> {
        let be = s.be;
        let n = lay.rows();
        let (h1, _) = be.rms_norm(x, &self.input_norm, s.eps)?;
        let (mut qkv, u0) = s.proj(&self.qkv, 0, &h1, n, None)?;
        drop(h1);
        be.rope(&mut qkv, lay, false)?;
        let (attn, lse) = be.attention(&qkv, lay, caches, s.layer)?;
        let (x1, u1) = s.proj(&self.o, 1, &attn, n, Some(be.clone_buf(x)?))?;
        let (h2, _) = be.rms_norm(&x1, &self.post_norm, s.eps)?;
        let (gu, u2) = s.proj(&self.gate_up, 2, &h2, n, None)?;
        drop(h2);
        let act = be.swiglu(&gu, self.gate_up.out / 2)?;
        let (x2, u3) = s.proj(&self.down, 3, &act, n, Some(be.clone_buf(&x1)?))?;
        let saved = keep.then_some(Saved {
            qkv,
            attn,
            lse,
            x1,
            gu,
            u: [u0, u1, u2, u3],
        });
        Ok((x2, saved))
    }

    /// Turns `g` = d loss / d output (n, hidden) into d loss / d input, in place (left
    /// partial when `need_dx` is false: the first layer's input is frozen), and adds the
    /// adapter gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        s: &Step,
        x: &Buf,
        saved: &Saved,
        g: &mut Buf,
        lay: &Layout,
        need_dx: bool,
        grads: &mut Buf,
    ) -> Result<()> {
        let be = s.be;
        let n = lay.rows();
        let [u0, u1, u2, u3] = &saved.u;
        let inter = self.gate_up.out / 2;
        // x2 = x1 + down(swiglu(gate_up(norm(x1))))
        let act = be.swiglu(&saved.gu, inter)?;
        let d_act = s.proj_bwd(&self.down, 3, &act, g, n, u3.as_ref(), true, grads)?;
        drop(act);
        let d_act = d_act.expect("asked for");
        let d_gu = be.swiglu_bwd(&saved.gu, &d_act, inter)?;
        drop(d_act);
        let (h2, r2) = be.rms_norm(&saved.x1, &self.post_norm, s.eps)?;
        let d_h2 = s.proj_bwd(&self.gate_up, 2, &h2, &d_gu, n, u2.as_ref(), true, grads)?;
        drop((d_gu, h2));
        be.rms_norm_bwd(
            &saved.x1,
            &self.post_norm,
            &r2,
            &d_h2.expect("asked for"),
            g,
            true,
        )?;
        // x1 = x + o(attention(rope(qkv(norm(x)))))
        let d_attn = s.proj_bwd(&self.o, 1, &saved.attn, g, n, u1.as_ref(), true, grads)?;
        let mut d_qkv = be.attention_bwd(
            &saved.qkv,
            &saved.attn,
            saved.lse.as_ref(),
            &d_attn.expect("asked for"),
            lay,
        )?;
        be.rope(&mut d_qkv, lay, true)?;
        let (h1, r1) = be.rms_norm(x, &self.input_norm, s.eps)?;
        let d_h1 = s.proj_bwd(&self.qkv, 0, &h1, &d_qkv, n, u0.as_ref(), need_dx, grads)?;
        drop((d_qkv, h1));
        if let Some(d_h1) = d_h1 {
            be.rms_norm_bwd(x, &self.input_norm, &r1, &d_h1, g, true)?;
        }
        Ok(())
    }
}
