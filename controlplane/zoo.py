"""The model zoo: the nine models of the GPU-let paper, built with seeded weights, and ``crop``,
the step that joins the *traffic* app's detector to its classifiers.

No weights can be downloaded where this runs, and serving cost does not depend
on weight values, so every model is its architecture with weights drawn from a
fixed seed. ``build(name)`` therefore returns the same module every time, and
``trace(name)`` the same TorchScript, which tests compare against what Triton
returns.

What a model looks like from the outside (inputs, outputs, dtypes, shapes) is
declared in ``model_repository/<name>/config.pbtxt``; this module only knows how
to make the network. The two are checked against each other in the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SEED = 20220711  # ATC'22; any fixed number would do

BERT_SEQ_LEN = 14
BERT_VOCAB = 30522


class LeNet(nn.Module):
    """LeNet-5 on 1x28x28 digits (as in the prototype's lenet)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SSDMobileNet(nn.Module):
    """SSD on a MobileNetV2 backbone for 3x300x300 images; returns 3000 boxes (x, y, w, h).

    Feature maps 19, 10, 5, 3, 2, 1 with 6 anchors each give 6*(361+100+25+9+4+1) = 3000
    boxes, the prototype's output size. Decoding and NMS are left to the client.
    """

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        feats = torchvision.models.mobilenet_v2().features
        self.stage1 = feats[:14]   # stride 16: 96 x 19 x 19
        self.stage2 = feats[14:]   # stride 32: 1280 x 10 x 10

        def extra(cin: int, cout: int, stride: int, pad: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(cin, cout // 2, 1), nn.ReLU6(),
                nn.Conv2d(cout // 2, cout, 3, stride=stride, padding=pad), nn.ReLU6(),
            )

        self.extras = nn.ModuleList([extra(1280, 512, 2, 1), extra(512, 256, 2, 1), extra(256, 256, 2, 1), extra(256, 128, 2, 1)])
        chans = [96, 1280, 512, 256, 256, 128]
        self.box_heads = nn.ModuleList([nn.Conv2d(c, 6 * 4, 3, padding=1) for c in chans])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [self.stage1(x)]
        maps.append(self.stage2(maps[0]))
        for e in self.extras:
            maps.append(e(maps[-1]))
        boxes = [h(m).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4) for h, m in zip(self.box_heads, maps)]
        return torch.cat(boxes, dim=1)


class Crop(nn.Module):
    """The *traffic* app's crop step: a 3x300x300 frame and its SSD boxes to one 3x224x224 crop.

    ``BOXES`` is ssd-mobilenet's ``OUTPUT`` as it comes: 3000 raw (x, y, w, h) per frame, not decoded
    against anchors. Each number goes through a sigmoid, so any raw value is a box inside the frame:
    w and h are fractions of the frame's width and height, x and y place the box within the room the
    frame leaves beside it (left = (1 - w) * x).

    One box per frame, so googlenet and vgg16 run at the detector's rate r, as in the prototype: the
    first. The zoo's SSD has no confidence head (scores, NMS and decoding are the client's), so no
    detection ranks above another; and a ranked pick (argmax of area, say) jumps between boxes whose
    scores differ by float noise — the seeded detector's 3000 boxes nearly all do — so the network run
    in-process and the one served with other thread counts could crop different boxes. The first
    box's crop moves only as much as its four numbers do.

    The crop is bilinear resampling through ``affine_grid`` and ``grid_sample``: plain aten operators,
    differentiable, that trace to TorchScript with a dynamic batch and load where torchvision's
    ``roi_align`` (a custom operator) would not, in the python backend's ``torch.jit.load``.
    """

    def __init__(self, size: int = 224) -> None:
        super().__init__()
        self.size = size

    def forward(self, frame: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        x, y, w, h = torch.sigmoid(boxes[:, 0]).unbind(1)              # the first box, each in (0, 1)
        # affine_grid maps the output's [-1, 1] square to [c - s, c + s] of the frame's: s = w, and the
        # centre c = 2 (left + w / 2) - 1 with left = (1 - w) x, so the box stays inside [-1, 1].
        cx, cy = (1 - w) * (2 * x - 1), (1 - h) * (2 * y - 1)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)   # [B, 2, 3]
        # F.affine_grid's own op: its Python checks of theta's shape would only warn the tracer
        grid = torch.affine_grid_generator(theta, [frame.shape[0], frame.shape[1], self.size, self.size], False)
        return F.grid_sample(frame, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BertEncoder(nn.Module):
    """A BERT-base-sized encoder (12 layers, 768 wide, 12 heads) with a 2-way classifier on [CLS]."""

    def __init__(self, layers: int = 12, width: int = 768, heads: int = 12) -> None:
        super().__init__()
        self.tok = nn.Embedding(BERT_VOCAB, width)
        self.pos = nn.Embedding(512, width)
        self.norm = nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, activation="gelu", batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(width, 2)
        # A buffer, not torch.arange in forward: tracing would freeze arange's device (the CPU).
        self.register_buffer("positions", torch.arange(512).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.tok(input_ids) + self.pos(self.positions[:, : input_ids.shape[1]]))
        return self.classifier(self.encoder(h)[:, 0])


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return make


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "lenet": LeNet,
    "googlenet": _tv("googlenet", aux_logits=False, init_weights=True),
    "resnet50": _tv("resnet50"),
    "ssd-mobilenet": SSDMobileNet,
    "vgg16": _tv("vgg16"),
    "mnasnet1_0": _tv("mnasnet1_0"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "densenet161": _tv("densenet161"),
    "bert": BertEncoder,
    "crop": Crop,
}

Input = tuple[str, torch.dtype, tuple[int, ...]]   # name, dtype, shape without the batch dimension

# Per-request inputs of each model, in the order its forward takes them.
INPUTS: dict[str, list[Input]] = {
    "lenet": [("INPUT", torch.float32, (1, 28, 28))],
    "ssd-mobilenet": [("INPUT", torch.float32, (3, 300, 300))],
    "bert": [("INPUT", torch.int64, (BERT_SEQ_LEN,))],
    **{n: [("INPUT", torch.float32, (3, 224, 224))] for n in
       ("googlenet", "resnet50", "vgg16", "mnasnet1_0", "mobilenet_v2", "densenet161")},
    "crop": [("FRAME", torch.float32, (3, 300, 300)), ("BOXES", torch.float32, (3000, 4))],
}


def names() -> list[str]:
    return list(BUILDERS)


def build(name: str) -> nn.Module:
    """The network with seeded weights, in eval mode, on the CPU."""
    if name not in BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(BUILDERS)}")
    torch.manual_seed(SEED)
    return BUILDERS[name]().eval()


def example_inputs(name: str, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of valid input for each of the model's inputs, in :data:`INPUTS`' order (random images
    and boxes in [0, 1), random token ids)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, BERT_VOCAB, (batch, *shape), generator=g, dtype=dtype) if dtype == torch.int64
                 else torch.rand((batch, *shape), generator=g, dtype=dtype) for _, dtype, shape in INPUTS[name])


def example_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """:func:`example_inputs` of a model that takes one input (all but crop)."""
    xs = example_inputs(name, batch, seed)
    if len(xs) != 1:
        raise ValueError(f"{name} takes {len(xs)} inputs ({', '.join(n for n, _, _ in INPUTS[name])}): "
                         "use example_inputs")
    return xs[0]


def trace(name: str) -> torch.jit.ScriptModule:
    """TorchScript of the model, traced on a batch of 2 so the batch dimension stays dynamic."""
    import warnings

    model = build(name)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated upstream but is what Triton's backends load.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(model, example_inputs(name, 2), check_trace=False)
