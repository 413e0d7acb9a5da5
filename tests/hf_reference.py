"""Hugging Face's LlamaForCausalLM holding the weights of our Transformer: the independent truth for
the Day 2 and generation tests."""

import torch


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent channel pairs (0,1),(2,3)...; Hugging Face rotates halves (0,d/2),(1,d/2+1)...
    Reordering the rows of wq and wk turns one convention into the other (as HF's conversion script does)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_hf_llama(model):
    """The same network as a transformers.LlamaForCausalLM, weights copied across."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = model.params
    config = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.dim, intermediate_size=p.hidden_dim,
                         num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads, num_key_value_heads=p.n_kv_heads,
                         max_position_embeddings=p.max_seq_len, rms_norm_eps=p.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
                         tie_word_embeddings=p.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf = LlamaForCausalLM(config).eval()
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        a, f, pre = layer.attention, layer.feed_forward, f"model.layers.{i}."
        sd.update({
            pre + "self_attn.q_proj.weight": meta_to_hf_rotary(a.wq.weight, p.n_heads),
            pre + "self_attn.k_proj.weight": meta_to_hf_rotary(a.wk.weight, p.n_kv_heads),
            pre + "self_attn.v_proj.weight": a.wv.weight, pre + "self_attn.o_proj.weight": a.wo.weight,
            pre + "mlp.gate_proj.weight": f.w1.weight, pre + "mlp.down_proj.weight": f.w2.weight,
            pre + "mlp.up_proj.weight": f.w3.weight,
            pre + "input_layernorm.weight": layer.attention_norm.weight,
            pre + "post_attention_layernorm.weight": layer.ffn_norm.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf
