"""A student ready to publish: the export folder a user pushes to the Hub unchanged, and `tdm push`.

`tdm export --student S --out exported/ [--eval outputs/evaluate/eval.json] [--samples s.npz]` writes, in one
atomic folder:

- `k<K>/` per K: the stock diffusers pipeline folders of `tdm.export.export_student`;
- `README.md`: the model card, written with `huggingface_hub.ModelCard` / `ModelCardData` (the Hub's metadata
  block: `base_model`, `library_name: diffusers`, `pipeline_tag`, `tags`, `license` inherited from the teacher's
  card where it has one, else "unknown"), the sampling recipe, the evaluation table with its protocol columns
  (`tdm.evaluation.table.markdown_table` of the given eval file's rows) and the sample grid;
- `tdm_recipe.json`: per K the timestep grid, the exported scheduler's config, guidance 1 (CFG is baked in;
  the CFG scale distilled is recorded), solver order, LoRA scale;
- `samples.png`: the sample grid (a given `tdm sample` output's grid, else rendered at export from the first K:
  4 samples, seed 0);
- for a LoRA-mode student whose `student_lora/` sits beside it (and that is not TDM-unify: a LoRA cannot carry
  the K embedding): `pytorch_lora_weights.safetensors` (diffusers format: `pipe.load_lora_weights(repo_id)`),
  and the layout ComfyUI loads for the family (docs/lora.md): for UNet families (sd15, sdxl) the kohya file
  `lora_comfyui.safetensors`; for DiT families (sd3, pixart, flux) the diffusers file itself (ComfyUI reads
  its `transformer.<path>` keys); none for families ComfyUI has no model for (digits, cogvideox);
- `eval.json`: a copy of the evaluation file the table is made of, when given.

`tdm push exported/ --repo-id user/name` uploads the folder with `HfApi.upload_folder` (after `create_repo(...,
exist_ok=True)`); `--dry-run` lists the files and sizes it would upload, checks the card parses, and touches
no network. A real push without a token fails with one line saying how to log in.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# family -> (pipeline_tag, ComfyUI layout or None, tags). ComfyUI layouts: docs/lora.md, "for ComfyUI".
FAMILY_CARDS = {
    "digits": ("text-to-image", None, ["tdm-digits"]),
    "sd15": ("text-to-image", "kohya", ["stable-diffusion", "stable-diffusion-diffusers"]),
    "sdxl": ("text-to-image", "kohya", ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]),
    "sd3": ("text-to-image", "diffusers", ["sd3", "stable-diffusion-3"]),
    "pixart_alpha": ("text-to-image", "diffusers", ["pixart-alpha"]),
    "pixart_sigma": ("text-to-image", "diffusers", ["pixart-sigma"]),
    "flux": ("text-to-image", "diffusers", ["flux"]),
    "cogvideox": ("text-to-video", None, ["cogvideox"]),
    "wan": ("text-to-video", None, ["wan"]),
}
BASE_TAGS = ["tdm", "trajectory-distribution-matching", "distillation", "few-step"]
CARD, RECIPE, GRID, EVAL, LORA_FILE, COMFY_FILE = ("README.md", "tdm_recipe.json", "samples.png", "eval.json",
                                                   "pytorch_lora_weights.safetensors", "lora_comfyui.safetensors")
DEFAULT_PROMPTS = ["a photo of a cat", "an astronaut riding a horse", "a red car in the rain",
                   "a bowl of fruit on a wooden table"]
UNKNOWN_LICENSE = "unknown"


def _hub_id(text: str | None) -> str | None:
    """`text` when it reads as a Hub repo id (owner/name, not a local path), else None."""
    if not text or Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def _teacher_card(teacher: str | None):
    """The teacher's model card (its folder's README.md, or the cached hub snapshot's), or None."""
    if not teacher:
        return None
    from huggingface_hub import ModelCard

    folder = Path(teacher).expanduser()
    if not folder.is_dir() and _hub_id(teacher):
        try:
            from tdm.backbones import resolve_model_path

            folder = resolve_model_path(teacher)
        except FileNotFoundError:
            return None
    readme = folder / CARD
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme)
    except Exception:  # a README without (valid) metadata: no license to inherit
        return None


def teacher_license(teacher: str | None) -> str:
    """The license in the teacher's model card metadata (`license`, or `license_name` for license: other);
    "unknown" where the teacher has no card or the card none."""
    card = _teacher_card(teacher)
    data = card.data.to_dict() if card is not None else {}
    license = data.get("license")
    if license == "other" and data.get("license_name"):
        return str(data["license_name"])
    return str(license) if license else UNKNOWN_LICENSE


def base_model_of(teacher: str | None, override: str | None = None) -> str | None:
    """The Hub id of the model the student was distilled from: `override`, else the record's teacher when it is
    a hub id, else the teacher card's own `base_model` (a local fine-tune of a hub model); None when unknown."""
    if override:
        return override
    if _hub_id(teacher):
        return teacher
    card = _teacher_card(teacher)
    base = card.data.to_dict().get("base_model") if card is not None else None
    return (base[0] if isinstance(base, list) and base else base) or None


def read_eval(path: str | Path) -> dict:
    """An evaluation file (the evaluate stage's eval.json / metrics/evaluate.json: {"rows": [...], ...}) checked:
    ValueError naming the file when it has no rows or a row is malformed."""
    from tdm.backbones import read_json_file
    from tdm.evaluation.rows import as_rows

    data = read_json_file(path, "an evaluation file ({\"rows\": [...]})")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: no evaluation rows (expected {{\"rows\": [...]}} as `tdm evaluate` writes)")
    try:
        as_rows(rows)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: {err}") from None
    return data


def _grid_from_samples(samples: Path, target: Path) -> None:
    """The grid of a `tdm sample` output: its PNG (beside an .npz, or the .png given), else rendered from the npz."""
    png = samples if samples.suffix == ".png" else samples.with_suffix(".png")
    if png.is_file():
        shutil.copyfile(png, target)
        return
    from PIL import Image

    from tdm.artifacts import image_grid, load_samples

    images, _ = load_samples(samples)
    grid = image_grid(images[:16], scale=max(1, 64 // images.shape[1]))
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(target, format="PNG")


def _render_grid(folder: Path, k: int, target: Path, n: int = 4) -> list[str]:
    """Sample the exported student in `folder` at K (n samples, seed 0, the digits prompts or DEFAULT_PROMPTS)
    and save the grid; returns the prompts."""
    from PIL import Image

    from tdm.artifacts import image_grid
    from tdm.data import prompt_set
    from tdm.sampler import sample_student
    from tdm.student import load_student

    student = load_student(folder)
    prompts = prompt_set("digits", n) if student.record.family == "digits" else DEFAULT_PROMPTS[:n]
    images = sample_student(student, prompts, k=k, seed=0, batch_size=n).numpy()
    if images.ndim == 5:  # video: the middle frame of each sample
        images = images[:, images.shape[1] // 2]
    grid = image_grid(images, scale=max(1, 64 // images.shape[1]))
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(target, format="PNG")
    return prompts


def _lora_source(student: Path, record) -> Path | None:
    folder = student.parent / "student_lora"
    return folder if record.mode == "lora" and not record.unify and folder.exists() else None


def _write_loras(lora_dir: Path, family: str, out: Path) -> dict:
    """The student's LoRA as `pytorch_lora_weights.safetensors` (diffusers) and the family's ComfyUI file."""
    import tempfile

    from tdm import lora as L

    lora = L.load_lora(lora_dir)
    files = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        written = L.save_lora(lora, Path(tmp) / "diffusers", "diffusers", None)
        shutil.move(str(written / L.DIFFUSERS_WEIGHTS), out / LORA_FILE)
    files["diffusers"] = LORA_FILE
    comfy = FAMILY_CARDS.get(family, (None, None, None))[1]
    if comfy == "kohya":
        L.save_lora(lora, out / COMFY_FILE, "kohya", "unet")
        files["comfyui"] = COMFY_FILE
    elif comfy == "diffusers":
        files["comfyui"] = LORA_FILE
    return files


def recipe(record, ks, out: Path, lora_files: dict | None) -> dict:
    """The sampling recipe written to tdm_recipe.json and shown on the card."""
    per_k = []
    for k in ks:
        config = json.loads((out / f"k{k}" / "scheduler" / "scheduler_config.json").read_text())
        per_k.append({"k": k, "folder": f"k{k}", "timesteps": record.timesteps(k).tolist(), "guidance_scale": 1.0,
                      "scheduler": config})
    return {"family": record.family, "teacher": record.teacher, "total_steps": record.total_steps,
            "grid_shift": record.shift, "solver_order": record.solver_order, "unify": record.unify,
            "distilled_guidance": record.guidance,
            "distilled_guidance_schedule": list(record.guidance_schedule) if record.guidance_schedule else None,
            "lora_scale": record.lora_scale, "mode": record.mode,
            "lora_files": lora_files or {}, "ks": per_k}


def _baked_guidance(rec: dict) -> str:
    schedule = rec.get("distilled_guidance_schedule")
    if schedule:
        return ", ".join(f"{w:g}" for w in schedule) + " (per step, largest timestep first)"
    return "not recorded" if rec["distilled_guidance"] is None else f"{rec['distilled_guidance']:g}"


def _card_text(rec: dict, eval_data: dict | None, eval_name: str | None, grid_prompts, license: str,
               base_model: str | None) -> str:
    """The card body (markdown) below the metadata block."""
    from tdm.evaluation.table import markdown_table

    fam, k0 = rec["family"], rec["ks"][0]
    lines = [f"# TDM student of {base_model or rec['teacher'] or 'its teacher'} ({fam}, "
             f"{', '.join(str(k['k']) for k in rec['ks'])} steps)", "",
             "A few-step student distilled with Trajectory Distribution Matching (TDM, ICCV 2025) by "
             "tdm. Classifier-free guidance is baked in: sample with `guidance_scale=1.0`.", ""]
    lines += ["## Sampling recipe", "",
              "| K | folder | timesteps | scheduler | guidance_scale |", "|---|---|---|---|---|"]
    for k in rec["ks"]:
        sched = k["scheduler"].get("_class_name", "?")
        lines.append(f"| {k['k']} | `{k['folder']}/` | {', '.join(map(str, k['timesteps']))} | {sched} "
                     f"(solver_order {rec['solver_order']}) | 1.0 |")
    lines += ["", f"- trajectory length (total_steps): {rec['total_steps']}, grid shift: {rec['grid_shift']:g}; "
              f"CFG scale distilled in: {_baked_guidance(rec)}",
              f"- LoRA scale: {rec['lora_scale']:g} (training mode: {rec['mode']})",
              f"- the full scheduler configs: `{RECIPE}`", ""]
    if fam == "digits":  # its pipeline class is tdm's own (tdm.backbones.digits), not one diffusers imports
        lines += ["```bash", f'hf download {REPO_ID} --include "{k0["folder"]}/*" --local-dir student',
                  f'tdm sample --model student/{k0["folder"]} --student --steps {k0["k"]} --out samples.npz',
                  "```", "", "(tdm installed from its repository: `pip install -e .` in a clone.)", ""]
    else:
        lines += ["```python", "from huggingface_hub import snapshot_download", "from diffusers import DiffusionPipeline",
                  "", "import tdm.scheduling_tdm  # the student's scheduler class (tdm: `pip install -e .` in a clone)",
                  f'folder = snapshot_download("{REPO_ID}", allow_patterns=["{k0["folder"]}/*"])',
                  f'pipe = DiffusionPipeline.from_pretrained(folder + "/{k0["folder"]}")',
                  f'image = pipe(prompt, num_inference_steps={k0["k"]}, guidance_scale=1.0).images[0]', "```", ""]
    files = rec["lora_files"]
    if files:
        lines += ["## LoRA", "", f"- diffusers: `{files['diffusers']}` on the teacher: `pipe.load_lora_weights("
                  f"\"{REPO_ID}\")`, `pipe.set_adapters([...], adapter_weights=[{rec['lora_scale']:g}])`, then the "
                  f"recipe's scheduler (`tdm.scheduling_tdm.from_student`)"]
        if "comfyui" in files:
            lines.append(f"- ComfyUI: `{files['comfyui']}` (" + ("kohya layout, `lora_unet_*` keys" if
                         files["comfyui"] == COMFY_FILE else "its `transformer.<module>` keys") + ")")
        else:
            lines.append(f"- ComfyUI: no native loader for the {fam} family")
        lines.append("")
    lines += ["## Evaluation", ""]
    if eval_data is not None:
        lines += [f"From `{eval_name}` (copied as `{EVAL}`):", "",
                  markdown_table(eval_data["rows"], eval_data.get("metrics_skipped")), ""]
    else:
        lines += ["No evaluation file was given at export (`tdm export --eval metrics/evaluate.json`).", ""]
    lines += ["## Samples", "", f"![samples]({GRID})", "",
              f"{len(grid_prompts) if grid_prompts else 'Given'} samples at K = {k0['k']}"
              + (f", seed 0: {'; '.join(grid_prompts)}" if grid_prompts else " (from a `tdm sample` output)"), ""]
    lines += ["## License", "", f"{license} (inherited from the teacher's model card)" if license != UNKNOWN_LICENSE
              else "unknown: the teacher's model card states none; check the teacher's terms before use.", ""]
    return "\n".join(lines)


def check_publish_inputs(eval_path: str | Path | None = None, samples: str | Path | None = None) -> dict | None:
    """The eval file (parsed: `read_eval`) and sample file checked before any export work; errors name
    `--eval` / `--samples`. Returns the eval data or None."""
    data = None
    if eval_path is not None:
        try:
            data = read_eval(eval_path)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"--eval: {err}") from None
    if samples is not None:
        s = Path(samples)
        if s.suffix not in (".npz", ".png") or not s.is_file():
            raise (FileNotFoundError if not s.is_file() else ValueError)(
                f"--samples: expected a `tdm sample` .npz (or its .png grid), got {samples}")
    return data


def export_for_hub(student: str | Path, out: str | Path, ks=None, solver_order: int | None = None,
                   eval_path: str | Path | None = None, samples: str | Path | None = None,
                   base_model: str | None = None, license: str | None = None) -> dict:
    """`tdm export`: the publishable folder described in the module docstring, written atomically (on any error
    nothing is left at `out`). Returns {"out", "folders", "files", "card"}. ValueError / FileNotFoundError naming
    the input before anything is written (K, solver order, eval file, samples)."""
    from huggingface_hub import ModelCard, ModelCardData

    from tdm.artifacts import atomic_folder
    from tdm.export import export_student
    from tdm.student import StudentRecord

    student = Path(student)
    eval_data = check_publish_inputs(eval_path, samples)
    record = StudentRecord.load(student)
    pipeline_tag, _, family_tags = FAMILY_CARDS.get(record.family, ("text-to-image", None, []))
    license = license or teacher_license(record.teacher)
    base = base_model_of(record.teacher, base_model)
    out = Path(out)
    with atomic_folder(out) as tmp:
        folders = export_student(student, tmp, ks, solver_order=solver_order)
        ks = [int(f.name[1:]) for f in folders]
        exported = StudentRecord.load(folders[0])
        lora_dir = _lora_source(student, record)
        lora_files = _write_loras(lora_dir, record.family, tmp) if lora_dir is not None else None
        rec = recipe(exported.replace(k=ks[0]), ks, tmp, lora_files)
        rec["solver_order"] = exported.solver_order
        (tmp / RECIPE).write_text(json.dumps(rec, indent=2))
        if samples is not None:
            _grid_from_samples(Path(samples), tmp / GRID)
            prompts = None
        else:
            prompts = _render_grid(folders[0], ks[0], tmp / GRID)
        if eval_data is not None:
            shutil.copyfile(eval_path, tmp / EVAL)
        tags = [*BASE_TAGS, *family_tags, *(["lora"] if lora_files else []), "text-to-image" if
                pipeline_tag == "text-to-image" else "text-to-video"]
        data = ModelCardData(base_model=base, library_name="diffusers", pipeline_tag=pipeline_tag,
                             tags=list(dict.fromkeys(tags)), license=license)
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _card_text(rec, eval_data, eval_path and
                                                                        str(eval_path), prompts, license, base))
        card.save(tmp / CARD)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "folders": [str(out / f.name) for f in folders], "files": files,
            "card": str(out / CARD)}


def upload_plan(folder: str | Path) -> list[dict]:
    """The files `upload_folder` would send from `folder` (hidden files and folders skipped, as the Hub
    client's default ignore does for `.git/` / `.cache/`): [{"path", "bytes"}], sorted."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append({"path": rel.as_posix(), "bytes": p.stat().st_size})
    return out


def check_push(folder: str | Path, repo_id: str):
    """The folder is a publishable export (a README.md whose metadata `ModelCard` parses, with library_name and
    pipeline_tag) and `repo_id` a valid Hub id; returns the card. ValueError / FileNotFoundError naming the
    folder / `--repo-id` otherwise."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("expected owner/name")
    except HFValidationError as err:
        raise ValueError(f"--repo-id: not a Hub repo id (owner/name): {repo_id!r} ({str(err).splitlines()[0]})") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    readme = folder / CARD
    if not readme.is_file():
        raise FileNotFoundError(f"{readme}: missing (write the folder with `tdm export`)")
    try:
        card = ModelCard.load(readme)
    except Exception as err:
        raise ValueError(f"{readme}: the model card's metadata does not parse ({err})") from None
    data = card.data.to_dict()
    missing = [k for k in ("library_name", "pipeline_tag") if not data.get(k)]
    if missing:
        raise ValueError(f"{readme}: metadata without {', '.join(missing)} (write the folder with `tdm export`)")
    return card


REPO_ID = "<repo-id>"  # the card's placeholder for the Hub id; `tdm push --repo-id` writes the real one in


def _set_repo_id(folder: Path, repo_id: str) -> bool:
    """Write `repo_id` into the card's loading code in place of the placeholder (atomically); True if it changed."""
    import os
    import tempfile

    card = folder / "README.md"
    text = card.read_text(encoding="utf-8")
    if REPO_ID not in text:
        return False
    fd, tmp = tempfile.mkstemp(prefix=".README.md.tmp-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text.replace(REPO_ID, repo_id))
    os.replace(tmp, card)
    return True


def push(folder: str | Path, repo_id: str, dry_run: bool = False, private: bool = False,
         revision: str | None = None, commit_message: str | None = None, token: str | None = None) -> dict:
    """`tdm push`: upload the export folder to the Hub model repo `repo_id` (`HfApi.create_repo(exist_ok=True)`
    then `HfApi.upload_folder`). `dry_run`: the files and sizes only, no network. ValueError when there is no
    token (`huggingface-cli login`, `HF_TOKEN`) or the hub is offline (HF_HUB_OFFLINE=1)."""
    import os

    check_push(folder, repo_id)
    files = upload_plan(folder)
    result = {"repo_id": repo_id, "folder": str(folder), "files": files, "bytes": sum(f["bytes"] for f in files),
              "dry_run": dry_run,
              "card_repo_id": REPO_ID in (Path(folder) / "README.md").read_text(encoding="utf-8")}
    if dry_run:  # card_repo_id: the card's loading code gets the real repo id when pushed
        return result
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: log in with `huggingface-cli login` (or set HF_TOKEN) to push; "
                         "`tdm push --dry-run` lists the files without one")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError("HF_HUB_OFFLINE is set: unset it (HF_HUB_OFFLINE=0) to push to the Hub")
    api = HfApi(token=token)
    _set_repo_id(Path(folder), repo_id)  # the card's snapshot_download / load_lora_weights lines name this repo
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload TDM student (tdm export)",
                             ignore_patterns=[".*", "**/.*"])
    result["commit"] = getattr(info, "commit_url", str(info))
    return result


__all__ = ["FAMILY_CARDS", "export_for_hub", "push", "upload_plan", "check_push", "teacher_license",
           "base_model_of", "read_eval", "recipe"]
