"""Reading a diffusers `config.json` into a model's small frozen config dataclass."""

from __future__ import annotations

import json
from pathlib import Path


class DiffusersConfig:
    """Mixin for frozen config dataclasses: keep the fields we know, lists become tuples."""

    @classmethod
    def known_fields(cls, raw: dict) -> dict:
        names = set(cls.__dataclass_fields__)
        return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}

    @classmethod
    def from_dict(cls, raw: dict):
        return cls(**cls.known_fields(raw))

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


class HeadsConfig:
    """Mixin for transformer configs with `num_attention_heads` x `attention_head_dim`."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim
