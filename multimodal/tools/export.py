"""ONNX export of a trained (or official) DEIMv2 checkpoint, with the same graph interface as the official export.

    python -m multimodal.tools.export --checkpoint checkpoints/phase2_best.pth --output model.onnx [--opset 17]

Inputs: ``images`` float32 [N, 3, S, S], already resized to S×S and normalised as in validation (see the model's
``image_size`` / ``normalize`` metadata), and ``orig_target_sizes`` int64 [N, 2] as (width, height). Outputs:
``labels`` int64 [N, k], ``boxes`` float32 [N, k, 4] xyxy in pixels of the original image, ``scores`` float32 [N, k],
sorted by score, k = min(300, queries × classes) (300 for every released variant). N is dynamic; every other axis
is static in the graph's output types (the tracer names the axes it cannot prove constant, such as ``boxes``' 4).

The detector runs in deploy mode (conv+BN folded, unused heads dropped). A multimodal checkpoint's class text
embeddings are constants of the graph (with what depends on them alone, such as their centred copy, precomputed
by constant folding): the exported model needs no text model and no extra input.
"""

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from deim_lib.cli import HelpFormatter, make_output_dir, report
from deim_lib.errors import UserError
from deim_lib.postprocessor import PostProcessor
from multimodal.files import atomic_write
from multimodal.tools.predict import InferenceModel, load_for_inference

INPUT_NAMES = ["images", "orig_target_sizes"]
# grid_sample (the decoder's deformable attention) entered ONNX in opset 16; the TorchScript exporter stops at 20.
OPSETS = range(16, 21)
OUTPUT_NAMES = ["labels", "boxes", "scores"]


class ExportError(UserError):
    """An export option that cannot work; the message says which values can."""


class DeployedDetector(nn.Module):
    """Detector + post-processor in deploy mode: ``forward(images, orig_target_sizes) -> (labels, boxes, scores)``.

    Shapes and formats as in the module docstring. Deploy mode changes the modules in place: ``inference.model`` is
    no longer loadable with a training state dict afterwards.
    """

    def __init__(self, inference: InferenceModel):
        super().__init__()
        model = inference.model
        model.detector.deploy()
        self.model = model.eval()
        self.postprocessor = PostProcessor(len(inference.class_names)).deploy()

    def forward(self, images: Tensor, orig_target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.postprocessor(self.model(images), orig_target_sizes)


def _metadata(inference: InferenceModel) -> dict[str, str]:
    """What an ONNX consumer needs to prepare inputs and name outputs; every value is a JSON string."""
    return {
        "variant": json.dumps(inference.variant),
        "class_names": json.dumps(inference.class_names),
        "image_size": json.dumps(inference.image_size),
        "normalize": json.dumps(inference.normalize),
    }


def _fix_output_shapes(model: onnx.ModelProto, outputs: Sequence[Tensor]) -> None:
    """Give every output axis but the batch axis its size in ``outputs``, the PyTorch model's outputs."""
    for graph_output, expected in zip(model.graph.output, outputs, strict=True):
        for axis, size in list(enumerate(expected.shape))[1:]:
            graph_output.type.tensor_type.shape.dim[axis].dim_value = size  # replaces the exporter's made-up name


def export_onnx(inference: InferenceModel, output: str | Path, opset: int = 17) -> onnx.ModelProto:
    """Write ``inference`` (model + post-processing, deploy mode, on the CPU) as ONNX to ``output`` and check it.

    Uses the TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs ``onnxscript``, which the
    official toolchain does not require. ``inference.model`` is switched to deploy mode in place. ``output`` is
    written atomically, once checked. Returns the checked model (with ``variant``, ``class_names``, ``image_size``
    and ``normalize`` as JSON metadata).
    """
    deployed = DeployedDetector(inference).cpu().eval()
    size = inference.image_size
    images = torch.rand(1, 3, size, size)
    sizes = torch.tensor([[size, size]], dtype=torch.int64)
    batch_axis = {0: "N"}
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
        outputs = deployed(images, sizes)
        # The tracer warns about every shape read in Python; at the fixed input size S those shapes are constants.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Slices with a step (strided feature indexing) stay unfolded, which is correct; the notice is only noise.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        # The TorchScript exporter is chosen on purpose (see above): its deprecation notice tells a user nothing.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        traced = Path(scratch, "model.onnx")
        torch.onnx.export(
            deployed,
            (images, sizes),
            str(traced),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=dict.fromkeys(INPUT_NAMES + OUTPUT_NAMES, batch_axis),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        exported = onnx.load(str(traced))
        _fix_output_shapes(exported, outputs)
    for key, value in _metadata(inference).items():
        exported.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(exported, full_check=True)
    atomic_write(output, lambda file: file.write(exported.SerializeToString()))
    return exported


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of train_progressive.py or official DEIMv2")
    parser.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset, {OPSETS.start}–{OPSETS.stop - 1}")
    parser.add_argument("--class-names", help="comma-separated names stored in the metadata (e.g. cat,dog)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.opset not in OPSETS:
            raise ExportError(
                f"--opset {args.opset}: choose {OPSETS.start}–{OPSETS.stop - 1} (the decoder needs "
                "grid_sample, opset 16; the exporter goes up to 20)"
            )
        make_output_dir(args.output.parent, "--output")  # before the checkpoint is read: a wrong path fails at once
        if args.output.is_dir():
            raise ExportError(f"--output {args.output}: is a folder; pass the path of the .onnx file to write")
        class_names = [name.strip() for name in args.class_names.split(",")] if args.class_names else None
        inference = load_for_inference(args.checkpoint, class_names)
        export_onnx(inference, args.output, args.opset)
    except UserError as error:
        return report(error)
    print(
        f"wrote {args.output} ({inference.variant}, {len(inference.class_names)} classes, input {inference.image_size})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
