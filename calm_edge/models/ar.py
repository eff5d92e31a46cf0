"""The token-by-token baseline: the same backbone class over single tokens, with a softmax head.

CALM and this model differ only in what a step predicts (the next chunk's latent against the next
token's distribution), so their comparison measures the method, not the architecture. Parameter
names follow Hugging Face's LlamaForCausalLM (`embed_tokens`, `layers`, `norm`, `lm_head`), so
the weights export to a Llama checkpoint unchanged.
"""
import torch.nn as nn
import torch.nn.functional as F

from calm_edge.config import Config
from calm_edge.models.backbone import Backbone, other_positions


class ARModel(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        backbone = config.ar.backbone
        self.embed_tokens = nn.Embedding(config.tokenizer.vocab_size, backbone.hidden_size)
        self.backbone = Backbone(backbone)
        self.lm_head = nn.Linear(backbone.hidden_size, config.tokenizer.vocab_size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        self.backbone.init_weights()

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def logits(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """(logits [batch, S, vocab], presents) with an explicit KV cache."""
        hidden, presents = self.backbone(self.embed_tokens(input_ids), attention_mask, position_ids, past_key_values)
        return self.lm_head(hidden), presents

    def forward(self, ids):
        """Next-token cross-entropy over windows [batch, T]."""
        hidden, _ = self.backbone(self.embed_tokens(ids[:, :-1]))
        logits = self.lm_head(hidden).float()
        targets = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        accuracy = (logits.argmax(-1) == targets).float().mean()
        metrics = {"ce": loss.detach(), "accuracy": accuracy.detach()}
        if not self.training:  # validation: the context diagnostic (calm_edge/models/backbone.py)
            elsewhere = self.lm_head(other_positions(hidden.reshape(-1, hidden.shape[-1]))).float()
            metrics["ce_other_context"] = F.cross_entropy(elsewhere, targets.reshape(-1)).detach()
        return loss, metrics
