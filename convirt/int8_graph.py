"""The text tower as an int8 ONNX graph: fp32 export, calibration and the integer rewrite.

convirt/quantize.py packages what this builds as a bundle's int8 artefact and serves it; this
module only knows graphs. Every ONNX Runtime session of the text tower (the calibration runs
here, the served encoder there) is configured by session_options.

The text tower (BERT, masked max-pooling, projection head: token ids and mask in, u
out) is exported with torch.onnx, and each of the 36 linear layers of the BERT encoder is rewritten
(quantize_graph) as an integer MatMul: weights int8 per output channel; activations int8 with
one scale per token, computed on each call (symmetric, zero point 128 in uint8, so that ONNX
Runtime's u8s8 kernels run it). Before that scale, each layer's input is divided per channel by
s_j = max|x_j|^0.5 / max|w_j|^0.5 and its weight rows multiplied by s (SmoothQuant, Xiao et al.
2023; the fp32 function is unchanged), with max|x_j| measured on CALIBRATION_TEXTS (sentences
written for this module: no dataset is needed to export). Attention scores, softmax, layer norms
and the projection head stay fp32. Why per token and smoothed: MiniLM's feed-forward inputs carry
a few channels 10-17x larger than the median, and their range differs from token to token;
with ONNX Runtime's stock dynamic quantisation (one activation scale per tensor, recomputed
per call, so a sentence's vector also depended on the batch it came in) the top-10 overlap with
fp32 over the dev splits was 0.82-0.85 (per-tensor weights) or 0.92-0.94 (per-channel weights),
0.93-0.96 smoothed; with one scale per token, smoothed: 0.97-0.98, and a text embeds identically
alone or in any batch. Text->image R@10 moves by at most 0.006 (docs/results.md "Int8 query encoder").
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bundle import Bundle

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


def int8_text_graph(
    bundle: Bundle, workdir: Path, calibration_texts: Sequence[str], alpha: float
) -> tuple[Any, int]:
    """The bundle's text tower as a checked int8 ONNX model, and how many layers were rewritten.
    The fp32 export passes through `workdir` (removed again)."""
    import onnx

    fp32_path = workdir / "text-fp32.onnx"
    export_fp32(bundle, fp32_path)
    model = onnx.load(str(fp32_path))
    fp32_path.unlink()
    inputs = sorted({node.input[0] for node, _ in _linear_matmuls(model.graph)})
    maxima = _input_maxima(
        model, inputs, bundle.tokenizer, calibration_texts, bundle.config.max_text_tokens
    )
    layers = quantize_graph(model, maxima, alpha)
    onnx.checker.check_model(model)
    return model, layers


def session_options(threads: int, spinning: bool = False):
    """One intra-op team of `threads` (the calling thread and threads-1 workers), no inter-op
    pool: the service calls it from its one model thread (service.model.threads), with as many
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
