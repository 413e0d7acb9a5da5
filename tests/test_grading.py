"""The graders graded: for every exercise, correct solutions written in the styles students use must pass the
same checks the graded tests run (tests/grading.py), and typical mistakes must fail with a message that names
the mistake.

These tests check the graders, not the scripts: each solution here is a subclass of the script's class with its
own forward (or a plain function), so the battery runs the same on the solutions and on a student's copy
(`pytest --impl exercises`). They carry no exercise marker and do not count in the exercise summary.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import grading
import llama
import transformer as T

NEG_INF = float("-inf")


def passes(exercise, impl):
    grading.run_checks(exercise, impl)  # raises grading.Wrong with the grader's message if it refused a solution


def fails_with(exercise, impl, phrase):
    with pytest.raises(grading.Wrong) as e:
        grading.run_checks(exercise, impl)
    assert phrase in str(e.value), f"the message does not say {phrase!r}:\n{e.value}"
    return str(e.value)


# ----------------------------------------------------------------------------------------------------
# patch_embedding: stem, conv, then flatten; or the patches cut out by hand and one matrix product (after the
# stem, proj is a 1x1 conv: patches of one pixel)


class PatchFlattenTranspose(T.PatchEmbedding):
    def forward(self, images):
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)


class PatchPermuteReshape(T.PatchEmbedding):
    def forward(self, images):
        x = self.proj(self.stem(images))  # (B, dim, h, w)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class PatchReshapePermute(T.PatchEmbedding):
    def forward(self, images):  # torchvision's _process_input: reshape to (B, dim, N), then permute
        x = self.proj(self.stem(images))
        B, D, h, w = x.shape
        return x.reshape(B, D, h * w).permute(0, 2, 1)


class PatchUnfoldMatmul(T.PatchEmbedding):
    def forward(self, images):
        x = self.stem(images)
        p = self.proj.kernel_size[0]
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
        return patches @ self.proj.weight.flatten(1).T + self.proj.bias


class PatchReshapeByHand(T.PatchEmbedding):
    def forward(self, images):  # cut the patches with view/permute, then one einsum with the kernel
        x = self.stem(images)
        B, C, H, W = x.shape
        p = self.proj.kernel_size[0]
        patches = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, p, p)
        return torch.einsum("bncij,dcij->bnd", patches, self.proj.weight) + self.proj.bias


class PatchStemOnlyWhenThere(T.PatchEmbedding):
    def forward(self, images):  # unfold + matmul for the plain patch projection, the modules with a stem
        if isinstance(self.stem, torch.nn.Identity):
            p = self.proj.kernel_size[0]
            return F.unfold(images, p, stride=p).transpose(1, 2) @ self.proj.weight.flatten(1).T + self.proj.bias
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)


class PatchNoStem(T.PatchEmbedding):
    def forward(self, images):  # the classic patch embedding: right without a stem only
        return self.proj(images).flatten(2).transpose(1, 2)


class PatchStemTwice(T.PatchEmbedding):
    def forward(self, images):
        n = self.stem(images).shape[-1] ** 2  # a shape check that runs the stem (and its BatchNorm) once more
        x = self.proj(self.stem(images))
        return x.flatten(2).transpose(1, 2)[:, :n]


class PatchColumnMajor(T.PatchEmbedding):
    def forward(self, images):
        return self.proj(self.stem(images)).transpose(2, 3).flatten(2).transpose(1, 2)


class PatchReshapeNoTranspose(T.PatchEmbedding):
    def forward(self, images):
        x = self.proj(self.stem(images))
        return x.reshape(x.shape[0], -1, x.shape[1])


class PatchChannelsFirst(T.PatchEmbedding):
    def forward(self, images):
        return self.proj(self.stem(images)).flatten(2)


class PatchNoBias(T.PatchEmbedding):
    def forward(self, images):
        return F.conv2d(self.stem(images), self.proj.weight, stride=self.proj.stride).flatten(2).transpose(1, 2)


class WrongOnlyWithStem(T.PatchEmbedding):
    """Right without a stem, so the grader's check with one is what must catch `tokens_with_stem`."""

    def forward(self, images):
        x = self.proj(self.stem(images))
        if isinstance(self.stem, torch.nn.Identity):
            return x.flatten(2).transpose(1, 2)
        return self.tokens_with_stem(x)


class PatchStemColumnMajor(WrongOnlyWithStem):
    def tokens_with_stem(self, x):
        return x.transpose(2, 3).flatten(2).transpose(1, 2)


class PatchStemReshapeNoTranspose(WrongOnlyWithStem):
    def tokens_with_stem(self, x):
        return x.reshape(x.shape[0], -1, x.shape[1])


class PatchStemChannelsFirst(WrongOnlyWithStem):
    def tokens_with_stem(self, x):
        return x.flatten(2)


@pytest.mark.parametrize("impl", [PatchFlattenTranspose, PatchPermuteReshape, PatchReshapePermute, PatchUnfoldMatmul,
                                  PatchReshapeByHand, PatchStemOnlyWhenThere])
def test_patch_embedding_grader_accepts(impl):
    passes("patch_embedding", impl)


@pytest.mark.parametrize("impl, phrase", [
    (PatchNoStem, "apply self.stem first"),
    (PatchStemTwice, "statistics 2 times, not once"),
    (PatchColumnMajor, "column by column"),
    (PatchReshapeNoTranspose, "mixes channels and patches"),
    (PatchChannelsFirst, "returned shape (2, 10, 9), expected (2, 9, 10)"),
    (PatchNoBias, "bias"),
])
def test_patch_embedding_grader_rejects(impl, phrase):
    fails_with("patch_embedding", impl, phrase)


@pytest.mark.parametrize("impl, phrase", [
    (PatchStemColumnMajor, "column by column"),
    (PatchStemReshapeNoTranspose, "mixes channels and patches"),
    (PatchStemChannelsFirst, "returned shape (2, 10, 16), expected (2, 16, 10)"),
])
def test_patch_embedding_grader_rejects_mistakes_made_only_with_a_stem(impl, phrase):
    assert "stem_channels=(6, 8)" in fails_with("patch_embedding", impl, phrase)


# ----------------------------------------------------------------------------------------------------
# attention: explicit softmax, einsum, SDPA; scale on q or on the scores; merging heads by reshape or view


class AttentionExplicit(T.MultiHeadSelfAttention):
    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.proj((self.attn_drop(w) @ v).transpose(1, 2).reshape(B, N, D))


class AttentionEinsum(T.MultiHeadSelfAttention):
    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, N, self.n_heads, self.head_dim) for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        w = self.attn_drop(scores.float().softmax(-1)).type_as(q)  # softmax in float32
        out = torch.einsum("bhqk,bkhd->bqhd", w, v)
        return self.proj(out.contiguous().view(B, N, D))


class AttentionSDPA(T.MultiHeadSelfAttention):
    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(out.permute(0, 2, 1, 3).flatten(2))


class AttentionHeadLoop(T.MultiHeadSelfAttention):
    def forward(self, x):  # one head at a time, concatenated
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = []
        for h in range(self.n_heads):
            sl = slice(h * self.head_dim, (h + 1) * self.head_dim)
            s = torch.bmm(q[..., sl], k[..., sl].transpose(1, 2)) * self.head_dim ** -0.5
            heads.append(torch.bmm(F.softmax(s, dim=2), v[..., sl]))
        return self.proj(torch.cat(heads, dim=-1))


def _attention(self, x, scale=None, softmax_dim=-1, merge=True, project=True):
    B, N, D = x.shape
    q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) * (self.scale if scale is None else scale), dim=softmax_dim)
    out = (w @ v).transpose(1, 2).reshape(B, N, D) if merge else (w @ v).reshape(B, N, D)
    return self.proj(out) if project else out


class AttentionScaleInPlace(T.MultiHeadSelfAttention):
    def forward(self, x):  # q is a view of the qkv output: scaling it in place breaks autograd
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q *= self.scale
        return self.proj((torch.softmax(q @ k.transpose(-2, -1), -1) @ v).transpose(1, 2).reshape(B, N, D))


class AttentionDetached(T.MultiHeadSelfAttention):
    def forward(self, x):
        return _attention(self, x.detach())


class AttentionNoScale(T.MultiHeadSelfAttention):
    def forward(self, x):
        return _attention(self, x, scale=1.0)


class AttentionScaleByDim(T.MultiHeadSelfAttention):
    def forward(self, x):
        return _attention(self, x, scale=x.shape[-1] ** -0.5)


class AttentionSoftmaxOverQueries(T.MultiHeadSelfAttention):
    def forward(self, x):
        return _attention(self, x, softmax_dim=-2)


class AttentionHeadsScrambled(T.MultiHeadSelfAttention):
    def forward(self, x):
        return _attention(self, x, merge=False)


class AttentionNoProj(T.MultiHeadSelfAttention):
    def forward(self, x):
        return _attention(self, x, project=False)


@pytest.mark.parametrize("impl", [AttentionExplicit, AttentionEinsum, AttentionSDPA, AttentionHeadLoop])
def test_attention_grader_accepts(impl):
    passes("attention", impl)


@pytest.mark.parametrize("impl, phrase", [
    (AttentionNoScale, "the scores are scaled by"),
    (AttentionScaleByDim, "which is 1/sqrt(dim), not head_dim"),
    (AttentionSoftmaxOverQueries, "the softmax is over the queries"),
    (AttentionHeadsScrambled, "merged without moving them"),
    (AttentionNoProj, "self.proj is not applied"),
    (AttentionScaleInPlace, "fails in training"),
    (AttentionDetached, "no gradient reaches the input"),
])
def test_attention_grader_rejects(impl, phrase):
    message = fails_with("attention", impl, phrase)
    if impl is AttentionSoftmaxOverQueries:
        assert "should sum to 1 over the keys" in message
    if impl is AttentionNoScale:
        assert "should be 1/sqrt(head_dim)" in message


def test_attention_diagnosis_reads_the_weights_and_the_scale():
    assert "sum to 1 (the softmax is over the keys" in grading.attention_diagnosis(AttentionExplicit)
    assert "as they should be" in grading.attention_diagnosis(AttentionSDPA)
    assert "which is 1 (no scaling)" in grading.attention_diagnosis(AttentionNoScale)
    assert "should sum to 1 over the keys" in grading.attention_diagnosis(AttentionSoftmaxOverQueries)


# ----------------------------------------------------------------------------------------------------
# encoder_block: as the hint, torchvision's layout, in place on the input


class BlockAsHint(T.EncoderBlock):
    def forward(self, x):
        x = x + self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class BlockTorchvisionStyle(T.EncoderBlock):
    def forward(self, input):
        x = self.ln_1(input)
        x = self.self_attention(x)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class BlockNewNames(T.EncoderBlock):
    def forward(self, x):  # only the output in place: nothing autograd saved is changed
        h = x + self.dropout(self.self_attention(self.ln_1(x)))
        out = self.mlp(self.ln_2(h))
        out += h
        return out


class BlockInPlace(T.EncoderBlock):
    def forward(self, x):  # ln_1 saved x for its backward pass; += changes it
        x += self.dropout(self.self_attention(self.ln_1(x)))
        x += self.mlp(self.ln_2(x))
        return x


class BlockFunctionalDropout(T.EncoderBlock):
    def forward(self, x):
        h = x + F.dropout(self.self_attention(self.ln_1(x)), self.dropout.p, self.training)
        return h + self.mlp(self.ln_2(h))


class BlockPostNorm(T.EncoderBlock):
    def forward(self, x):
        x = self.ln_1(x + self.self_attention(x))
        return self.ln_2(x + self.mlp(x))


class BlockParallel(T.EncoderBlock):
    def forward(self, x):
        return x + self.dropout(self.self_attention(self.ln_1(x))) + self.mlp(self.ln_2(x))


class BlockNoAttentionResidual(T.EncoderBlock):
    def forward(self, x):
        x = self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class BlockNoDropout(T.EncoderBlock):
    def forward(self, x):
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class BlockSwappedNorms(T.EncoderBlock):
    def forward(self, x):
        x = x + self.dropout(self.self_attention(self.ln_2(x)))
        return x + self.mlp(self.ln_1(x))


@pytest.mark.parametrize("impl", [BlockAsHint, BlockTorchvisionStyle, BlockNewNames, BlockFunctionalDropout])
def test_encoder_block_grader_accepts(impl):
    passes("encoder_block", impl)


@pytest.mark.parametrize("impl, phrase", [
    (BlockPostNorm, "post-norm"),
    (BlockParallel, "in parallel"),
    (BlockNoAttentionResidual, "attention branch is not added"),
    (BlockNoDropout, "needs self.dropout"),
    (BlockSwappedNorms, "ln_1 and ln_2 are swapped"),
    (BlockInPlace, "use the out-of-place form"),
])
def test_encoder_block_grader_rejects(impl, phrase):
    fails_with("encoder_block", impl, phrase)


# ----------------------------------------------------------------------------------------------------
# rmsnorm: float32 upcast or not, rsqrt or sqrt, F.rms_norm, Meta's or Hugging Face's order of weight and cast


class RMSNormMeta(llama.RMSNorm):
    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class RMSNormNoUpcast(llama.RMSNorm):
    def forward(self, x):
        return x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * self.weight


class RMSNormFunctional(llama.RMSNorm):
    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RMSNormHFOrder(llama.RMSNorm):
    def forward(self, x):  # weight times the result cast back, as Hugging Face's LlamaRMSNorm
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RMSNormCastAtTheEnd(llama.RMSNorm):
    def forward(self, x):  # weight applied in float32, then one cast to the input's dtype
        h = x.float()
        ms = torch.einsum("...d,...d->...", h, h).unsqueeze(-1) / h.shape[-1]
        return (h / (ms + self.eps).sqrt() * self.weight.float()).to(x.dtype)


class RMSNormNorm(llama.RMSNorm):
    def forward(self, x):
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) ** 2 / x.shape[-1]
        return self.weight * (x * (ms + self.eps).rsqrt())


class RMSNormSum(llama.RMSNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps) * self.weight


class RMSNormNoWeight(llama.RMSNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class RMSNormLayerNorm(llama.RMSNorm):
    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RMSNormNoSqrt(llama.RMSNorm):
    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RMSNormMeanOverAll(llama.RMSNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean() + self.eps) * self.weight


class RMSNormInPlace(llama.RMSNorm):
    def forward(self, x):
        return x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight


class RMSNormStaysFloat32(llama.RMSNorm):
    def forward(self, x):  # forgets to cast back: a bf16 model gets float32 activations
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.parametrize("impl", [RMSNormMeta, RMSNormNoUpcast, RMSNormFunctional, RMSNormHFOrder,
                                  RMSNormCastAtTheEnd, RMSNormNorm])
def test_rmsnorm_grader_accepts(impl):
    passes("rmsnorm", impl)


@pytest.mark.parametrize("impl, phrase", [
    (RMSNormSum, "a sum of x^2 instead of its mean"),
    (RMSNormNoWeight, "the weight is not applied"),
    (RMSNormLayerNorm, "that is LayerNorm"),
    (RMSNormNoSqrt, "not by its square root"),
    (RMSNormMeanOverAll, "over every dimension"),
    (RMSNormInPlace, "changed its input in place"),
    (RMSNormStaysFloat32, "returned torch.float32"),
])
def test_rmsnorm_grader_rejects(impl, phrase):
    message = fails_with("rmsnorm", impl, phrase)
    if impl is RMSNormSum:  # the ratio to the reference is printed: 1/sqrt(16) = 0.25 everywhere
        assert "between 0.25 and 0.25" in message


# ----------------------------------------------------------------------------------------------------
# swiglu


class SwiGLUWrittenOut(llama.FeedForward):
    def forward(self, x):
        gate = self.w1(x)
        return self.w2(gate * torch.sigmoid(gate) * self.w3(x))


class SwiGLUFused(llama.FeedForward):
    def forward(self, x):  # w1 and w3 as one matrix product, split afterwards
        gate, up = F.linear(x, torch.cat([self.w1.weight, self.w3.weight])).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2.weight)


class SwiGLUModule(llama.FeedForward):
    def forward(self, x):
        return self.w2(torch.nn.SiLU()(self.w1(x)).mul(self.w3(x)))


def _swiglu(act, gate_of="w1", product_first=False):
    class Wrong(llama.FeedForward):
        def forward(self, x):
            g, u = (self.w1(x), self.w3(x)) if gate_of == "w1" else (self.w3(x), self.w1(x))
            return self.w2(act(g * u) if product_first else act(g) * u)
    return Wrong


class SwiGLUNoGate(llama.FeedForward):
    def forward(self, x):
        return self.w2(F.silu(self.w1(x)))


@pytest.mark.parametrize("impl", [SwiGLUWrittenOut, SwiGLUFused, SwiGLUModule])
def test_swiglu_grader_accepts(impl):
    passes("swiglu", impl)


@pytest.mark.parametrize("impl, phrase", [
    (_swiglu(F.silu, gate_of="w3"), "gates w3(x) instead of w1(x)"),
    (_swiglu(F.gelu), "GELU instead of SiLU"),
    (_swiglu(torch.sigmoid), "sigmoid instead of SiLU"),
    (_swiglu(F.silu, product_first=True), "after the product"),
    (SwiGLUNoGate, "no gate"),
    (_swiglu(F.relu), "differs from the reference by up to"),
])
def test_swiglu_grader_rejects(impl, phrase):
    fails_with("swiglu", impl, phrase)


# ----------------------------------------------------------------------------------------------------
# causal_mask: arange comparison, tril with an offset, the complement of triu, a slice of the full triangle


def mask_arange(seqlen, start_pos=0, device=None):
    return torch.arange(start_pos + seqlen, device=device)[None, :] <= torch.arange(seqlen, device=device)[:, None] + start_pos


def mask_tril_diagonal(seqlen, start_pos=0, device=None):
    return torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=device).tril(diagonal=start_pos)


def mask_not_triu(seqlen, start_pos=0, device=None):
    return ~torch.triu(torch.ones(seqlen, start_pos + seqlen, device=device), diagonal=start_pos + 1).bool()


def mask_slice_of_full(seqlen, start_pos=0, device=None):
    n = start_pos + seqlen
    return torch.tril(torch.ones(n, n, device=device)).bool()[-seqlen:]


def mask_loops(seqlen, start_pos=0, device=None):
    return torch.tensor([[key <= start_pos + i for key in range(start_pos + seqlen)] for i in range(seqlen)],
                        device=device)


def mask_ignores_device(seqlen, start_pos=0, device=None):
    return torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool).tril(diagonal=start_pos)


def mask_strict(seqlen, start_pos=0, device=None):
    return torch.arange(start_pos + seqlen)[None, :] < torch.arange(start_pos, start_pos + seqlen)[:, None]


def mask_not_offset(seqlen, start_pos=0, device=None):
    return torch.ones(seqlen, seqlen).tril().bool()


def mask_triangle_from_zero(seqlen, start_pos=0, device=None):
    return torch.ones(seqlen, start_pos + seqlen).tril().bool()


def mask_inverted(seqlen, start_pos=0, device=None):
    return ~mask_arange(seqlen, start_pos, device)


def mask_additive(seqlen, start_pos=0, device=None):
    return torch.zeros(seqlen, start_pos + seqlen).masked_fill(~mask_arange(seqlen, start_pos), NEG_INF)


def mask_transposed(seqlen, start_pos=0, device=None):
    return torch.ones(seqlen, start_pos + seqlen).triu(diagonal=start_pos).bool()


@pytest.mark.parametrize("impl", [mask_arange, mask_tril_diagonal, mask_not_triu, mask_slice_of_full, mask_loops])
def test_causal_mask_grader_accepts(impl):
    passes("causal_mask", impl)


@pytest.mark.parametrize("impl, phrase", [
    (mask_strict, "blocked from itself"),
    (mask_not_offset, "not offset by start_pos"),
    (mask_triangle_from_zero, "query i sits at position start_pos + i"),
    (mask_inverted, "inverted"),
    (mask_additive, "must be boolean"),
    (mask_transposed, "sees the future key"),
    (mask_ignores_device, "build it on `device`"),
])
def test_causal_mask_grader_rejects(impl, phrase):
    fails_with("causal_mask", impl, phrase)


# ----------------------------------------------------------------------------------------------------
# temperature_sampling: multinomial with or without float32, powers of the probabilities, Gumbel-max,
# an exponential race, in place on the logits


def sample_multinomial(logits, temperature=1.0, generator=None):
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)


def sample_in_place(logits, temperature=1.0, generator=None):
    logits.div_(temperature)
    return torch.multinomial(logits.float().softmax(-1), num_samples=1, generator=generator)


def sample_power(logits, temperature=1.0, generator=None):  # softmax(l)^(1/T) is proportional to softmax(l/T)
    return torch.multinomial(F.softmax(logits, -1) ** (1 / temperature), 1, generator=generator)


def sample_gumbel(logits, temperature=1.0, generator=None):
    u = torch.rand(logits.shape, generator=generator).clamp_min(1e-20)
    return (logits / temperature - torch.log(-torch.log(u))).argmax(-1, keepdim=True)


def sample_exponential_race(logits, temperature=1.0, generator=None):
    probs = F.softmax(logits / temperature, -1)
    return (probs / torch.empty_like(probs).exponential_(1.0, generator=generator)).argmax(-1, keepdim=True)


def sample_after_softmax(logits, temperature=1.0, generator=None):
    return torch.multinomial(F.softmax(logits, -1) / temperature, 1, generator=generator)


def sample_multiplied(logits, temperature=1.0, generator=None):
    return torch.multinomial(F.softmax(logits * temperature, -1), 1, generator=generator)


def sample_global_rng(logits, temperature=1.0, generator=None):
    return torch.multinomial(F.softmax(logits / temperature, -1), 1)


def sample_greedy(logits, temperature=1.0, generator=None):
    return logits.argmax(-1, keepdim=True)


def sample_flat(logits, temperature=1.0, generator=None):
    return torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("impl", [sample_multinomial, sample_in_place, sample_power, sample_gumbel,
                                  sample_exponential_race])
def test_temperature_sampling_grader_accepts(impl):
    passes("temperature_sampling", impl)


@pytest.mark.parametrize("impl, phrase", [
    (sample_after_softmax, "the temperature has no effect"),
    (sample_multiplied, "multiplied by the temperature"),
    (sample_global_rng, "seeded alike gave different draws"),
    (sample_greedy, "that is greedy"),
    (sample_flat, "expected one token id per row, (batch, 1)"),
])
def test_temperature_sampling_grader_rejects(impl, phrase):
    fails_with("temperature_sampling", impl, phrase)


# ----------------------------------------------------------------------------------------------------
# top_k: a threshold at the k-th largest (keeps ties), exactly k by scatter, sort, kthvalue, in place, finfo.min


def topk_threshold(logits, k):
    return logits.masked_fill(logits < torch.topk(logits, k).values[:, [-1]], NEG_INF)


def topk_scatter(logits, k):  # exactly k tokens, whichever of the tied ones topk returns
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, NEG_INF).scatter(-1, indices, values)


def topk_sort_in_place(logits, k):
    kth = logits.sort(dim=-1, descending=True).values[..., k - 1:k]
    logits[logits < kth] = NEG_INF
    return logits


def topk_kthvalue_finfo_min(logits, k):
    kth = torch.kthvalue(logits, logits.shape[-1] - k + 1, dim=-1, keepdim=True).values
    return torch.where(logits >= kth, logits, torch.finfo(logits.dtype).min)


def topk_clamped_loop(logits, k):
    out = torch.full_like(logits, NEG_INF)
    for row in range(logits.shape[0]):
        idx = logits[row].argsort(descending=True)[:min(k, logits.shape[-1])]
        out[row, idx] = logits[row, idx]
    return out


def topk_k_minus_one(logits, k):
    return logits.masked_fill(logits <= torch.topk(logits, k).values[:, [-1]], NEG_INF)


def topk_k_plus_one(logits, k):
    kk = min(k + 1, logits.shape[-1])
    return logits.masked_fill(logits < torch.topk(logits, kk).values[:, [-1]], NEG_INF)


def topk_smallest(logits, k):
    values, indices = torch.topk(logits, k, largest=False)
    return torch.full_like(logits, NEG_INF).scatter(-1, indices, values)


def topk_sorted_order(logits, k):
    values = logits.sort(dim=-1, descending=True).values
    values[..., k:] = NEG_INF
    return values


def topk_probabilities(logits, k):
    probs = F.softmax(logits, -1)
    return probs.masked_fill(logits < torch.topk(logits, k).values[:, [-1]], NEG_INF)


@pytest.mark.parametrize("impl", [topk_threshold, topk_scatter, topk_sort_in_place, topk_kthvalue_finfo_min,
                                  topk_clamped_loop])
def test_top_k_grader_accepts(impl):
    passes("top_k", impl)


@pytest.mark.parametrize("impl, phrase", [
    (topk_k_minus_one, "the k-th included"),
    (topk_k_plus_one, "one token too many"),
    (topk_smallest, "kept but should be removed"),
    (topk_sorted_order, "still in sorted order"),
    (topk_probabilities, "not probabilities"),
])
def test_top_k_grader_rejects(impl, phrase):
    message = fails_with("top_k", impl, phrase)
    assert "expected (largest first)" in message or "not probabilities" in message or "every token" in message


# ----------------------------------------------------------------------------------------------------
# top_p: the common recipe, Hugging Face's warper written out, a loop, mass-before with all ties kept


def topp_common_recipe(logits, p):
    # sort descending, remove where the cumulative probability exceeds p, shifted right so that the token
    # crossing p stays, then scatter the mask back to the tokens' own positions
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), NEG_INF)


def topp_hf_written_out(logits, p):
    # ascending order: remove the low tail whose mass is at most 1 - p, always keep the most likely token
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= 1 - p
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)


def topp_loop(logits, p):
    out = logits.clone()
    for row in range(logits.shape[0]):
        probs = torch.softmax(logits[row].double(), -1)
        order = probs.argsort(descending=True).tolist()
        mass, keep = 0.0, []
        for i in order:
            keep.append(i)
            mass += probs[i].item()
            if mass >= p:
                break
        drop = torch.ones(logits.shape[-1], dtype=torch.bool)
        drop[keep] = False
        out[row, drop] = NEG_INF
    return out


def topp_mass_before_in_place(logits, p):
    probs = logits.softmax(-1)
    sorted_probs, idx = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    threshold = sorted_probs.masked_fill(~keep_sorted, 2.0).min(-1, keepdim=True).values
    logits[probs < threshold] = NEG_INF  # ties with the last kept token are kept too
    return logits


def topp_drops_crossing_token(logits, p):
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(sorted_logits, -1), -1) > p
    remove[..., 0] = False  # keeps at least one, but not the token that crosses p
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), NEG_INF)


def topp_no_shift(logits, p):
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(sorted_logits, -1), -1) > p
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), NEG_INF)


def topp_not_scattered(logits, p):
    sorted_logits, _ = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, -1), -1)
    remove = cum - F.softmax(sorted_logits, -1) >= p
    return logits.masked_fill(remove, NEG_INF)


def topp_one_too_many(logits, p):
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(sorted_logits, -1), -1) > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., :2] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), NEG_INF)


def topp_logits_not_probs(logits, p):
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    remove = torch.cumsum(sorted_logits, -1) > p  # no softmax: sums logits
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), NEG_INF)


@pytest.mark.parametrize("impl", [topp_common_recipe, topp_hf_written_out, topp_loop, topp_mass_before_in_place])
def test_top_p_grader_accepts(impl):
    passes("top_p", impl)


@pytest.mark.parametrize("impl, phrase", [
    (topp_drops_crossing_token, "the token whose probability crosses p must stay"),
    (topp_no_shift, "crosses p must stay"),
    (topp_not_scattered, "still in sorted order"),
    (topp_one_too_many, "one token too many"),
    (topp_logits_not_probs, "the kept set is wrong"),
])
def test_top_p_grader_rejects(impl, phrase):
    fails_with("top_p", impl, phrase)


def test_every_exercise_has_graded_checks():
    assert sorted(grading._CHECKS) == sorted(grading.EXERCISES), "tests/grading.py's checks and the registry differ"
    assert all(grading.CHECKS.values())
