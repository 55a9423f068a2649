"""Networks that save and load like diffusers models: ``save_pretrained`` / ``from_pretrained``.

Every network of the project (the VQ-GAN, the X-ray encoder, the latent UNet, the GAN
generators) subclasses :class:`Pretrained`::

    model.save_pretrained("out/vqgan")          # config.json + diffusion_pytorch_model.safetensors
    VQGAN.from_pretrained("out/vqgan")          # any plain Python process, no pickle, no CLI

Why diffusers' ``ModelMixin`` / ``ConfigMixin`` and not a loader of our own: they bring the
folder layout users know, safetensors (sharding, ``torch_dtype``), meta-device construction
and strict key checks for free. Where they do not fit — ``ConfigMixin`` records flat
``__init__`` keyword arguments, while our networks take one typed, validated config dataclass —
the config is recorded as one ``cfg`` entry (plain JSON, :func:`patching.artifacts.format.config_to_dict`)
and turned back into the dataclass by :func:`patching.artifacts.format.config_from_dict` on load. So
the dataclasses stay the one description of a model, and ``config.json`` round-trips through
them. (Kept apart from :mod:`patching.artifacts.format` so reading a config does not import diffusers.)
"""

from __future__ import annotations

from typing import Any, ClassVar

from diffusers import ConfigMixin, ModelMixin

from patching.artifacts.format import config_from_dict, config_to_dict


class Pretrained(ModelMixin, ConfigMixin):
    """A network built from one typed config dataclass, with diffusers' ``save_pretrained`` /
    ``from_pretrained`` (``config.json`` holds ``{"cfg": <the dataclass as JSON>}``).

    A subclass sets ``config_class`` and starts its ``__init__`` with
    ``cfg = self.init_config(cfg)``, which accepts the dataclass or its JSON form (what
    ``from_pretrained`` passes) and records it for ``save_pretrained``.
    """

    config_name = "config.json"
    config_class: ClassVar[type]

    def init_config(self, cfg: Any) -> Any:
        if not isinstance(cfg, self.config_class):
            cfg = config_from_dict(self.config_class, cfg, where=f"{type(self).__name__} config")
        self.register_to_config(cfg=config_to_dict(cfg))
        return cfg
