"""An int8 query encoder for CPU serving: the text tower in ONNX Runtime, int8 weights and activations.

    convirt export --int8 BUNDLE      writes BUNDLE/int8/ (text.onnx + int8.json), atomically
    CONVIRT_QUANTIZE=int8             `convirt serve` embeds query texts with it (and quantises
                                      at startup, into a temporary folder, when it is missing)

Only the query path changes: training, evaluation and indexing stay fp32 (torch), the index
vectors are the training-time model's, image queries use the fp32 image tower. The artefact lives
inside the bundle folder, so retraining (which replaces the folder) removes it together with the
weights it came from; int8.json records the fingerprint of the bundle it was derived from and the
sha256 of text.onnx, and an artefact derived from another bundle, or damaged, is refused with the
command that fixes it (`convirt export --int8 BUNDLE`). The bundle's fingerprint (what the index
records) is unchanged: the artefact is beside the weights, not part of them.

What it is. The text tower (BERT, masked max-pooling, projection head: token ids and mask in, u
out) is exported with torch.onnx, and each of the 36 linear layers of the BERT encoder is rewritten
(quantize_graph) as an integer MatMul: weights int8 per output channel; activations int8 with
one scale per token, computed on each call (symmetric, zero point 128 in uint8, so that ONNX
Runtime's u8s8 kernels run it). Before that scale, each layer's input is divided per channel by
s_j = max|x_j|^0.5 / max|w_j|^0.5 and its weight rows multiplied by s (SmoothQuant, Xiao et al.
2023; the fp32 function is unchanged), with max|x_j| measured on CALIBRATION_TEXTS (sentences
written for this module: no dataset is needed to export). Attention scores, softmax, layer norms
and the projection head stay fp32. Why per token and smoothed: MiniLM's feed-forward inputs carry
a few channels 10-17x larger than the median, and their range differs from token to token; with ONNX Runtime's stock dynamic quantisation (one activation scale per tensor, recomputed
per call, so a sentence's vector also depended on the batch it came in) the top-10 overlap with
fp32 over the dev splits was 0.82-0.85 (per-tensor weights) or 0.92-0.94 (per-channel weights),
0.93-0.96 smoothed; with one scale per token, smoothed: 0.97-0.98, and a text embeds identically
alone or in any batch. Text->image R@10 moves by at most 0.006 (docs/results.md "Int8 query encoder").

Why ONNX Runtime, not torch's dynamic quantisation. Both measured by bench/quantized_quality.py on
the 2-core box (the 1-epoch `cpu` bundle, medpix dev sentences through Embedder.embed_texts, each
encoder in its own process, 2 threads; docs/benchmarks.md "Int8 query encoder"). Speed is close:
one sentence fp32 7.8 ms, torch int8 (quantize_dynamic on every nn.Linear) 2.6 ms, this encoder
2.2 ms (1.5 with ONNX Runtime's spinning on); 32 sentences 133, 41 and 49 ms (37 spinning).
Quality decides: torch's version keeps one activation scale per tensor and offers no way to
smooth or to scale per token short of new kernels; its top-10 overlap with fp32 was 0.77-0.80
(cosine 0.95) against 0.97-0.98 here. ONNX Runtime runs the rewritten graph with stock
operators (QuantizeLinear per row, MatMulInteger), is a pip wheel for every platform, and its
sessions run one intra-op team from the calling thread, as service/threads.py wants.

The image tower stays fp32 in torch: ONNX Runtime's static int8 EfficientNet-Lite0 (QDQ, per-channel,
calibrated on 48 train images) gave an image->image top-10 overlap of 0.944 with fp32, under the
0.95 this path promises (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bundle import Bundle, BundleError, load_bundle, read_bundle_info, replace_dir

log = logging.getLogger(__name__)

FOLDER = "int8"  # inside the bundle folder
INFO_NAME = "int8.json"
MODEL_NAME = "text.onnx"
FORMAT = 1
QUERY_ENCODER = "int8-onnx"  # what /readyz reports for this path ("fp32" for the torch one)
SMOOTHING_ALPHA = 0.5
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
PROVIDERS = ["CPUExecutionProvider"]

# Calibration for the smoothing scales: only each input channel's largest magnitude is kept, and
# BERT's outlier channels are the same for every input, so a few dozen sentences of the kind the
# service is asked (short, imaging, several modalities) are enough.
CALIBRATION_TEXTS = (
    "Bilateral ground-glass opacities in the lower lobes.",
    "No focal consolidation, pleural effusion or pneumothorax.",
    "Small left pleural effusion with adjacent atelectasis.",
    "The cardiac silhouette is enlarged.",
    "Right upper lobe mass with hilar lymphadenopathy.",
    "Axial CT of the abdomen showing a large liver mass.",
    "Contrast-enhanced CT demonstrates a ring-enhancing lesion in the right frontal lobe.",
    "T2-weighted MRI shows a hyperintense lesion in the left temporal lobe.",
    "Sagittal MRI of the lumbar spine with disc herniation at L4-L5.",
    "Frontal chest radiograph with diffuse bilateral interstitial opacities.",
    "Nasogastric tube tip projects over the stomach.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Displaced fracture of the distal radius.",
    "Ultrasound shows a hypoechoic nodule in the right thyroid lobe.",
    "Multiple hypodense lesions in the liver, consistent with metastases.",
    "Dilated loops of small bowel with air-fluid levels.",
    "Free air under the right hemidiaphragm.",
    "Cavitary lesion in the left upper lobe.",
    "Patchy airspace disease in the right middle lobe, likely pneumonia.",
    "Mild cardiomegaly with pulmonary vascular congestion.",
    "Coronal CT shows a calculus in the left renal pelvis with hydronephrosis.",
    "Enlarged mediastinal lymph nodes.",
    "Subdural hematoma along the right convexity with midline shift.",
    "Non-contrast head CT without acute intracranial abnormality.",
    "Diffusion restriction in the left middle cerebral artery territory.",
    "Peripheral wedge-shaped opacity suggesting pulmonary infarction.",
    "Filling defect in the right main pulmonary artery consistent with pulmonary embolism.",
    "Lytic lesion in the proximal femur.",
    "Osteophytes and joint space narrowing of the knee.",
    "A well-circumscribed cystic mass in the pancreatic head.",
    "Thickened gallbladder wall with pericholecystic fluid.",
    "Appendix is dilated to 12 mm with periappendiceal fat stranding.",
    "Aortic aneurysm measuring 5.2 cm in the infrarenal segment.",
    "Spiculated nodule in the left lower lobe measuring 2 cm.",
    "Honeycombing and traction bronchiectasis at the lung bases.",
    "Lungs are clear. Heart size is normal.",
    "Chest X-ray PA view of a 45-year-old man with cough and fever.",
    "Post-operative changes after sternotomy with intact wires.",
    "Multifocal consolidation in both lungs in a patient with COVID-19.",
    "Angiography shows stenosis of the left anterior descending artery.",
    "PET-CT demonstrates FDG-avid lymph nodes in the neck.",
    "Mammogram with a spiculated mass and microcalcifications in the upper outer quadrant.",
    "The ventricles are enlarged, suggesting hydrocephalus.",
    "Fluid collection in the pelvis with an enhancing rim, an abscess.",
    "Vertebral compression fracture of T12.",
    "Soft tissue swelling without underlying fracture.",
    "Widened mediastinum on the portable chest film.",
    "Right-sided pneumothorax with partial collapse of the lung.",
)


class QuantizedModelError(BundleError):
    """The int8 artefact is missing, damaged, or was derived from another bundle."""


def int8_dir(bundle_dir: str | Path) -> Path:
    return Path(bundle_dir) / FOLDER


# -- export ------------------------------------------------------------------------------------


class _TextTower(nn.Module):
    """Token ids and mask in, the unnormalised joint-space u out (what Embedder normalises)."""

    def __init__(self, text_encoder: nn.Module, text_head: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_head = text_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.text_encoder(input_ids, attention_mask))


def export_fp32(bundle: Bundle, path: Path) -> None:
    """The bundle's text tower as an fp32 ONNX graph (dynamic batch and length)."""
    model = bundle.model
    tower = _TextTower(copy.deepcopy(model.text_encoder), copy.deepcopy(model.text_head))
    tower = tower.to("cpu").float().eval()
    example = bundle.tokenizer(list(CALIBRATION_TEXTS[:2]), padding=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices of the exporter
        torch.onnx.export(
            tower,
            (example["input_ids"], example["attention_mask"]),
            str(path),
            dynamo=False,
            input_names=list(INPUTS),
            output_names=["u"],
            dynamic_axes={
                **{name: {0: "batch", 1: "tokens"} for name in INPUTS},
                "u": {0: "batch"},
            },
            opset_version=OPSET,
        )


def _linear_matmuls(graph: Any) -> list[tuple[Any, np.ndarray]]:
    """(node, weight K x N) of every MatMul of the BERT encoder by a constant weight: its linear
    layers (attention scores and the projection head's Gemms are left alone)."""
    from onnx import numpy_helper

    weights = {init.name: init for init in graph.initializer}
    return [
        (node, numpy_helper.to_array(weights[node.input[1]]))
        for node in graph.node
        if node.op_type == "MatMul"
        and "/encoder/" in node.name
        and node.input[1] in weights
        and len(weights[node.input[1]].dims) == 2
    ]


def _input_maxima(
    model: Any, inputs: list[str], tokenizer: Any, texts: Sequence[str], max_tokens: int
) -> dict[str, np.ndarray]:
    """Per channel, the largest |x| of each named tensor over `texts` (one text per run, so
    padding plays no part), from the fp32 graph with those tensors made outputs."""
    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs
    )
    session = ort.InferenceSession(
        probe.SerializeToString(), session_options(torch.get_num_threads()), providers=PROVIDERS
    )
    maxima: dict[str, np.ndarray] = {}
    for text in texts:
        encoded = tokenizer([text], truncation=True, max_length=max_tokens, return_tensors="np")
        feeds = {name: encoded[name].astype(np.int64) for name in INPUTS}
        values = session.run(inputs, feeds)
        for name, value in zip(inputs, values, strict=True):
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(0)
            maxima[name] = np.maximum(maxima[name], channel_max) if name in maxima else channel_max
    return maxima


def quantize_graph(model: Any, maxima: dict[str, np.ndarray], alpha: float) -> int:
    """Rewrite every linear MatMul(x, W) of the encoder as int8 (in place); returns how many.

    Per input tensor x (shared by the query, key and value layers), once:
        x' = x / s                          smoothing, s_j = max|x_j|^a / max|W_j|^(1-a)
        r = max(|x'|) per row / 127         one scale per token
        q = QuantizeLinear(x', r, 128)      uint8, zero point 128 (symmetric)
    Per layer: y = MatMulInteger(q, Wq, 128) * w * r, with Wq = round(W s / w) int8 and w the
    per-output-channel weight scale. The bias Add that follows is unchanged.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    targets = _linear_matmuls(graph)
    consumers: dict[str, list[tuple[Any, np.ndarray]]] = {}
    for node, weight in targets:
        consumers.setdefault(node.input[0], []).append((node, weight))
    new_initializers = [
        numpy_helper.from_array(np.array(127.0, np.float32), "q8/127"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "q8/eps"),
        numpy_helper.from_array(np.array(128, np.uint8), "q8/zero_point"),
        numpy_helper.from_array(np.array([-1], np.int64), "q8/flat"),
        numpy_helper.from_array(np.array([0, 0], np.int64), "q8/rows"),
    ]
    replaced: dict[str, list[Any]] = {}  # MatMul node name -> the nodes that replace it
    for n, (x, layers) in enumerate(consumers.items()):
        k = layers[0][1].shape[0]
        w_max = np.max([np.abs(w).max(1) for _, w in layers], axis=0)  # per input channel
        scale = np.clip(
            np.maximum(maxima[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha),
            1e-2,
            1e2,
        ).astype(np.float32)
        p = f"q8/x{n}"
        new_initializers.append(numpy_helper.from_array(1 / scale, f"{p}/inverse_scale"))
        new_initializers.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}/2d"))
        nodes = [
            helper.make_node("Mul", [x, f"{p}/inverse_scale"], [f"{p}/smoothed"]),
            helper.make_node("Abs", [f"{p}/smoothed"], [f"{p}/abs"]),
            helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/max"], axes=[-1], keepdims=1),
            helper.make_node("Div", [f"{p}/max", "q8/127"], [f"{p}/scale0"]),
            helper.make_node("Max", [f"{p}/scale0", "q8/eps"], [f"{p}/row_scale"]),
            helper.make_node("Reshape", [f"{p}/row_scale", "q8/flat"], [f"{p}/row_scale_1d"]),
            helper.make_node("Shape", [f"{p}/row_scale_1d"], [f"{p}/rows"]),
            helper.make_node(
                "ConstantOfShape",
                [f"{p}/rows"],
                [f"{p}/zero_points"],
                value=helper.make_tensor("v", TensorProto.UINT8, [1], [128]),
            ),
            helper.make_node("Reshape", [f"{p}/smoothed", f"{p}/2d"], [f"{p}/smoothed_2d"]),
            helper.make_node(
                "QuantizeLinear",
                [f"{p}/smoothed_2d", f"{p}/row_scale_1d", f"{p}/zero_points"],
                [f"{p}/q_2d"],
                axis=0,
            ),
            helper.make_node("Shape", [f"{p}/smoothed"], [f"{p}/shape"]),
            helper.make_node("Reshape", [f"{p}/q_2d", f"{p}/shape"], [f"{p}/q"]),
        ]
        for m, (node, weight) in enumerate(layers):
            smoothed = weight * scale[:, None]
            w_scale = (np.maximum(np.abs(smoothed).max(0), 1e-12) / 127).astype(np.float32)
            w_q = np.clip(np.round(smoothed / w_scale), -127, 127).astype(np.int8)
            name = f"{p}/l{m}"
            new_initializers.append(numpy_helper.from_array(w_q, f"{name}/weight"))
            new_initializers.append(numpy_helper.from_array(w_scale, f"{name}/weight_scale"))
            nodes += [
                helper.make_node(
                    "MatMulInteger",
                    [f"{p}/q", f"{name}/weight", "q8/zero_point"],
                    [f"{name}/int32"],
                ),
                helper.make_node(
                    "Cast", [f"{name}/int32"], [f"{name}/float"], to=TensorProto.FLOAT
                ),
                helper.make_node("Mul", [f"{name}/float", f"{name}/weight_scale"], [f"{name}/y0"]),
                helper.make_node("Mul", [f"{name}/y0", f"{p}/row_scale"], [node.output[0]]),
            ]
        for i, new in enumerate(nodes):
            new.name = f"{p}/{i}"
        # the x-side nodes go where the first of its layers was, the rest after them
        replaced[layers[0][0].name] = nodes
        for node, _ in layers[1:]:
            replaced[node.name] = []
    old_weights = {node.input[1] for node, _ in targets}
    rewritten = []
    for node in graph.node:
        rewritten.extend(replaced.get(node.name, [node]))
    del graph.node[:]
    graph.node.extend(rewritten)
    kept = [init for init in graph.initializer if init.name not in old_weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    return len(targets)


def write_int8(
    bundle: Bundle,
    folder: Path,
    calibration_texts: Sequence[str] = CALIBRATION_TEXTS,
    *,
    alpha: float = SMOOTHING_ALPHA,
) -> dict:
    """Export and quantise the bundle's text tower into `folder` (text.onnx, int8.json)."""
    import onnx
    import onnxruntime

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    fp32_path = folder / "text-fp32.onnx"
    export_fp32(bundle, fp32_path)
    model = onnx.load(str(fp32_path))
    fp32_path.unlink()
    inputs = sorted({node.input[0] for node, _ in _linear_matmuls(model.graph)})
    maxima = _input_maxima(
        model, inputs, bundle.tokenizer, calibration_texts, bundle.config.max_text_tokens
    )
    layers = quantize_graph(model, maxima, alpha)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / MODEL_NAME))
    info = {
        "format": FORMAT,
        "bundle_fingerprint": bundle.fingerprint,
        "query_encoder": QUERY_ENCODER,
        "engine": f"onnxruntime {onnxruntime.__version__}",
        "exported_with": f"torch {torch.__version__}, onnx {onnx.__version__}, opset {OPSET}",
        "quantisation": f"{layers} BERT linear layers: weights int8 per output channel, "
        "activations int8 per token (symmetric, smoothed); attention scores, projection head fp32",
        "smoothing_alpha": alpha,
        "calibration_texts": len(calibration_texts),
        "model_sha256": _sha256(folder / MODEL_NAME),
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_int8(
    bundle_dir: str | Path, calibration_texts: Sequence[str] = CALIBRATION_TEXTS
) -> dict:
    """BUNDLE/int8/ from the bundle, written atomically (a half-written one never appears)."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    target = int8_dir(bundle_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=bundle_dir))
    try:
        info = write_int8(bundle, staging, calibration_texts)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- serving -------------------------------------------------------------------------------------


def read_int8_info(folder: Path, bundle_fingerprint: str) -> dict:
    """int8.json, checked against the bundle it must come from (cheap: no model is loaded)."""
    fix = f"run `convirt export --int8 {folder.parent}` to derive it from this bundle"
    info_path = folder / INFO_NAME
    if not info_path.is_file() or not (folder / MODEL_NAME).is_file():
        raise QuantizedModelError(f"no int8 query encoder in {folder}: {fix}")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise QuantizedModelError(
            f"{folder}: int8 artefact format {info.get('format')!r}, this version reads {FORMAT}; "
            + fix
        )
    if info.get("bundle_fingerprint") != bundle_fingerprint:
        raise QuantizedModelError(
            f"{folder} was derived from the bundle with fingerprint "
            f"{info.get('bundle_fingerprint')}, not from this one ({bundle_fingerprint}): "
            "its queries would not match the index; " + fix
        )
    return info


def check_int8(bundle_dir: str | Path, bundle_fingerprint: str) -> dict | None:
    """int8.json of BUNDLE/int8 when the artefact is there and belongs to this bundle (format,
    fingerprint, sha256 of text.onnx checked); None when there is none. Raises
    QuantizedModelError for one that cannot be served."""
    folder = int8_dir(bundle_dir)
    if not folder.exists():
        return None
    info = read_int8_info(folder, bundle_fingerprint)
    if _sha256(folder / MODEL_NAME) != info.get("model_sha256"):
        raise QuantizedModelError(
            f"{folder / MODEL_NAME} does not match the sha256 recorded in {INFO_NAME} (damaged "
            f"or replaced): run `convirt export --int8 {folder.parent}` again"
        )
    return info


def session_options(threads: int, spinning: bool = False):
    """One intra-op team of `threads` (the calling thread and threads-1 workers), no inter-op
    pool: the service calls it from its one model thread (service.threads), with as many
    threads as torch has there. Workers do not spin after a run: between model calls the same
    cores run the event loop, the searches, the decoders and torch's image tower. In process,
    spinning is faster (one sentence 1.5 ms instead of 2.2), but in the service it cost image
    queries 39% of their requests/s at 8 clients and text queries 9% at 32 (docs/benchmarks.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


class Int8TextEncoder:
    """(input_ids, attention_mask) -> u, as ConVIRT.encode_text's second output, in ONNX Runtime."""

    name = QUERY_ENCODER

    def __init__(self, model_path: Path, info: dict, threads: int, spinning: bool = False):
        import onnxruntime as ort

        self.info = info
        self.session = ort.InferenceSession(
            str(model_path), session_options(threads, spinning), providers=PROVIDERS
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {
            "input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False),
        }
        return torch.from_numpy(self.session.run(None, feeds)[0])


def load_int8(
    bundle: Bundle, threads: int | None = None, *, build_missing: bool = False
) -> Int8TextEncoder:
    """The bundle's int8 query encoder (BUNDLE/int8), checked to come from this bundle.

    build_missing: when the bundle has none, quantise it now into a temporary folder (tens of
    seconds) instead of refusing. One derived from another bundle is refused either way.
    """
    threads = threads or torch.get_num_threads()
    if bundle.path is None:
        raise QuantizedModelError("the bundle has no folder: load it with load_bundle(path)")
    info = check_int8(bundle.path, bundle.fingerprint)
    if info is None and build_missing:
        log.warning(
            "no int8 query encoder in %s: quantising now (run `convirt export --int8 %s` once "
            "to start faster)",
            int8_dir(bundle.path),
            bundle.path,
        )
        with tempfile.TemporaryDirectory(prefix="convirt-int8-") as tmp:
            info = write_int8(bundle, Path(tmp))
            return Int8TextEncoder(Path(tmp) / MODEL_NAME, info, threads)
    if info is None:
        raise QuantizedModelError(
            f"no int8 query encoder in {int8_dir(bundle.path)}: run "
            f"`convirt export --int8 {bundle.path}`"
        )
    return Int8TextEncoder(int8_dir(bundle.path) / MODEL_NAME, info, threads)


class ReleasedTextTower(nn.Module):
    """In place of a model's fp32 text encoder once the int8 copy embeds every query text."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "the fp32 text tower was released because query texts go through the int8 encoder "
            "(CONVIRT_QUANTIZE=int8); load the bundle again to embed texts in fp32"
        )


def release_text_tower(bundle: Bundle) -> int:
    """Drop the bundle's fp32 text encoder (the int8 copy replaces it in a server); returns the
    bytes of parameters let go. Only for a bundle nothing else embeds texts with."""
    model = bundle.model
    if isinstance(model.text_encoder, ReleasedTextTower):
        return 0
    size = sum(p.numel() * p.element_size() for p in model.text_encoder.parameters())
    model.text_encoder = ReleasedTextTower()
    return size


# -- `convirt export` ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="convirt export",
        description="Derive a serving artefact from a model bundle. --int8: the text tower "
        "(the query encoder) as an int8 ONNX Runtime model in BUNDLE/int8/, served with "
        "CONVIRT_QUANTIZE=int8; the fp32 bundle, its fingerprint and the index stay as they are.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle folder (RUN/bundle)")
    parser.add_argument(
        "--int8", action="store_true", required=True, help="quantise the query encoder to int8"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fingerprint = read_bundle_info(args.bundle)["fingerprint"]
        info = export_int8(args.bundle)
    except (BundleError, OSError) as err:
        print(f"convirt export: error: {err}", file=sys.stderr)
        return 1
    size = (int8_dir(args.bundle) / MODEL_NAME).stat().st_size
    print(
        f"wrote {int8_dir(args.bundle)}: {MODEL_NAME} ({size / 2**20:.1f} MiB, "
        f"{info['engine']}) from bundle {fingerprint} in {info['export_seconds']} s; "
        "serve it with CONVIRT_QUANTIZE=int8"
    )
    return 0
