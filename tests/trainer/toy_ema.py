"""A toy state part for the extension test: an exponential moving average of the embedder's weights, updated after
every optimizer step (ema = decay * ema + (1 - decay) * w), kept in every checkpoint. Registered by the test
with one line, `register_state_part(EMAPart)`."""
import torch

from trainer.state_parts import StatePart


class EMAPart(StatePart):
    key = "ema"
    decay = 0.9

    def __init__(self, embedder: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.weights = {k: v for k, v in embedder.state_dict(keep_vars=True).items() if v.is_floating_point()}
        self.shadow = {k: v.detach().clone() for k, v in self.weights.items()}
        optimizer.register_step_post_hook(lambda *_: self.update())

    @classmethod
    def build(cls, trained):
        return cls(trained.embedder, trained.optimizer)

    @torch.no_grad()
    def update(self) -> None:
        for k, w in self.weights.items():
            self.shadow[k].mul_(self.decay).add_(w.detach(), alpha=1 - self.decay)

    def local_state(self) -> dict:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_local_state(self, value: dict) -> None:
        for k, v in self.shadow.items():
            v.copy_(value[k])
