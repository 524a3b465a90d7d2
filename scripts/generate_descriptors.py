"""Descriptor files for the comparative-descriptor classifier (Comparative-CLIP, WACV 2025; spec §7.1).

    python scripts/generate_descriptors.py --fetch dtd                      # the released JSONs
    python scripts/generate_descriptors.py dtd --similar [--n 10]           # step 1: similar classes
    python scripts/generate_descriptors.py dtd --kind comparative --write-batch   # step 2: Batch-API JSONL
    python scripts/generate_descriptors.py dtd --kind comparative --submit        # ... and submit it
    python scripts/generate_descriptors.py dtd --kind comparative --batch-id batch_abc   # collect + parse
    python scripts/generate_descriptors.py dtd --kind comparative --batch-output out.jsonl  # parse a file
    python scripts/generate_descriptors.py dtd --kind comparative --hf-model <id>  # local LM instead

DATASET is a data config name (`configs/data/<name>.yaml`, whose `dataset` gives the class names) or
a registered dataset. Files go to `<root>/descriptors/<DATASET>/` (root: --root, $DATA_ROOT, ./data):
`similar_classes.json` ({class: [its n most similar classes]}), `batch_<kind>.jsonl` (the requests),
`batch_<kind>_output.jsonl` (the answers) and `<kind>.json` ({class: [descriptor, ...]}), which
`method=cdesc` / `method=dclip` read (`reprolab.data.descriptors`).

- Similar classes (step 1): cosine similarity of the bare class names under a CLIP text tower
  (default OpenAI ViT-B/32 through open_clip, the weights of HF `openai/clip-vit-base-patch32` that
  upstream uses); the n most similar per class, most similar first. n = 10 (EuroSAT 9, `params.sh`).
- Comparative descriptors (step 2): one request per (class c, similar class c'): two few-shot Q/A
  examples drawn at random (`--seed`) from ten, then the spec's question. The answer's lines that
  begin with "- " are the descriptors; D_c concatenates them over c' (duplicates kept).
  # DEVIATION: the ten few-shot examples are this project's own (the upstream ones are not copied),
  # and no system message is sent; generated files therefore differ from the released ones, which
  # `--fetch` downloads for the reproduction.
- Plain (DCLIP) descriptors: one request per class with this project's own DCLIP-style question.
- `--fetch`: the released files of `hk1ee/Comparative-CLIP` at the commit the spec read, re-keyed to
  this project's class names (by name, or by label position where the names differ and the class
  counts agree, e.g. EuroSAT's "brushland or shrubland" = "Herbaceous Vegetation Land"); what was
  matched how is written to `<kind>.source.json`.

Offline, without an API key, or without the `openai` / model files, each step stops with one line
that says what is missing and what to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from reprolab.data.descriptors import (  # noqa: E402
    KINDS,
    SIMILAR_FILE,
    descriptor_dir,
    match_keys,
    read_descriptor_file,
    write_descriptor_file,
)

log = logging.getLogger("generate_descriptors")

UPSTREAM_REPO = "hk1ee/Comparative-CLIP"
UPSTREAM_COMMIT = "1cef50fa71dfcf520bb3310152198c02c8fc1a12"  # "WACV 2025", read by the spec
UPSTREAM_FOLDER = {"comparative": "comparative_descriptors", "plain": "dclip_descriptors"}
# This project's data names -> upstream's dataset names (`tools.DATASETS`).
UPSTREAM_NAME = {
    "imagenet": "imagenet",
    "imagenet_v2": "imagenetv2",
    "caltech256": "caltech256",
    "cifar100": "cifar100",
    "cub": "cub",
    "eurosat": "eurosat",
    "places365": "places365",
    "food101": "food101",
    "oxford_pets": "pets",
    "dtd": "dtd",
    "oxford_flowers": "flowers102",
    "fgvc_aircraft": "fgvcaircraft",  # upstream's 70 families: use fgvc_aircraft_family
    "fgvc_aircraft_family": "fgvcaircraft",
    "stanford_cars": "cars",
}
SIMILAR_N = {"eurosat": 9}  # `params.sh` n_list; 10 elsewhere
DEFAULT_N = 10
DEFAULT_LLM = "gpt-4o"
MAX_TOKENS = 1000
ENDPOINT = "/v1/chat/completions"
ID_SEP = "~"

# The spec's question (§7.1 step 2) and its answer opening; few-shot answers list "- feature" lines.
COMPARATIVE_Q = (
    "Q: What are useful features for distinguishing a {c} from a {other} in the photo? Give the "
    "list of features, each beginning with a hyphen (-).\n"
    "A: There are several useful visual features to tell the photo is a {c}, not a {other}."
)
# This project's own few-shot examples: (target, similar class, features of the target).
FEW_SHOT: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("zebra", "horse", ("black and white stripes", "a short upright mane", "a tufted tail")),
    (
        "lighthouse",
        "water tower",
        ("a lantern room at the top", "a rocky shore", "red and white bands"),
    ),
    ("croissant", "bagel", ("a crescent shape", "flaky layered pastry", "pointed ends")),
    (
        "sunflower",
        "daisy",
        ("a large dark brown centre", "bright yellow petals", "a thick hairy stem"),
    ),
    (
        "snowboard",
        "ski",
        ("one wide board", "bindings across the board", "a rider standing sideways"),
    ),
    ("owl", "hawk", ("a flat round face", "large forward-facing eyes", "ear tufts")),
    (
        "marble floor",
        "granite floor",
        ("soft swirling veins", "pale even colour", "a polished sheen"),
    ),
    ("violin", "cello", ("a small body held under the chin", "no endpin", "a short bow")),
    ("desert", "beach", ("sand dunes", "no waterline", "sparse dry shrubs")),
    ("tram", "bus", ("overhead power lines", "rails in the street", "a pantograph on the roof")),
)
N_SHOTS = 2
# DCLIP-style (plain) question, this project's wording.
PLAIN_Q = (
    "Q: Which visual features help to recognise a {c} in a photo? Give the list of features, each "
    "beginning with a hyphen (-).\n"
    "A: There are several useful visual features to tell there is a {c} in a photo:"
)


class StepError(Exception):
    """A step cannot run: the message is one line saying what is missing and what to run."""


# -- class names ---------------------------------------------------------------------------------


def classnames_of(dataset: str) -> list[str]:
    """Class names of a data config (its `dataset`, `dataset_kwargs`) or a registered dataset."""
    from reprolab.data.spec import get_spec

    cfg_path = PROJECT_ROOT / "configs" / "data" / f"{dataset}.yaml"
    name, kwargs = dataset, {}
    if cfg_path.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(cfg_path)
        name = str(cfg.get("dataset", dataset))
        kw = cfg.get("dataset_kwargs")
        kwargs = dict(OmegaConf.to_container(kw, resolve=False)) if kw else {}
    return list(get_spec(name, **kwargs).classnames)


# -- step 1: similar classes ---------------------------------------------------------------------


def most_similar(embeddings: Any, classnames: Sequence[str], n: int) -> dict[str, list[str]]:
    """Per class, the `n` other classes whose embeddings are most cosine-similar, most similar first."""
    import torch
    import torch.nn.functional as F

    e = F.normalize(torch.as_tensor(embeddings).float(), dim=-1)
    sim = e @ e.t()
    sim.fill_diagonal_(float("-inf"))
    n = min(n, len(classnames) - 1)
    order = sim.topk(n, dim=1).indices.tolist()
    return {c: [classnames[j] for j in order[i]] for i, c in enumerate(classnames)}


def similar_classes(
    classnames: Sequence[str], n: int, arch: str, pretrained: str | None, cache_dir: str | None
) -> dict[str, list[str]]:
    """Step 1 with a CLIP text tower through `CLIPBackbone` (bare class names, no template)."""
    import torch

    from reprolab.models.clip import CLIPBackbone

    try:
        backbone = CLIPBackbone("similar", arch, pretrained=pretrained, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise StepError(" ".join(str(e).split())) from e
    with torch.no_grad():
        emb = torch.cat(
            [
                backbone.encode_text([c.replace("_", " ") for c in classnames[i : i + 256]])
                for i in range(0, len(classnames), 256)
            ]
        )
    return most_similar(emb, classnames, n)


# -- step 2: requests ----------------------------------------------------------------------------


def comparative_prompt(c: str, other: str, rng: random.Random) -> str:
    """Two few-shot Q/A examples drawn with `rng`, then the question about (c, other)."""
    shots = rng.sample(FEW_SHOT, N_SHOTS)
    blocks = [
        COMPARATIVE_Q.format(c=t, other=o) + "\n" + "\n".join(f"- {f}" for f in feats)
        for t, o, feats in shots
    ]
    return "\n\n".join([*blocks, COMPARATIVE_Q.format(c=c, other=other) + "\n"])


def plain_prompt(c: str, rng: random.Random) -> str:
    """Two few-shot examples (their targets' features) and the DCLIP-style question about c."""
    shots = rng.sample(FEW_SHOT, N_SHOTS)
    blocks = [
        PLAIN_Q.format(c=t) + "\n" + "\n".join(f"- {f}" for f in feats) for t, _, feats in shots
    ]
    return "\n\n".join([*blocks, PLAIN_Q.format(c=c) + "\n"])


def batch_requests(
    dataset: str,
    kind: str,
    classnames: Sequence[str],
    similar: dict[str, list[str]] | None = None,
    seed: int = 42,
    model: str = DEFAULT_LLM,
) -> list[dict[str, Any]]:
    """OpenAI Batch-API request lines: one per (c, c') for `comparative`, one per c for `plain`.

    `custom_id` is `<dataset>~<c>~<c'>` (comparative) or `<dataset>~<c>` (plain), as upstream.
    """
    bad = [c for c in classnames if ID_SEP in c]
    if bad:
        raise StepError(f"class names may not contain {ID_SEP!r} (used in custom_id): {bad[:3]}")
    rng = random.Random(seed)
    out = []
    for c in classnames:
        if kind == "comparative":
            if similar is None or c not in similar:
                raise StepError(
                    f"no similar classes for {c!r}; run `python scripts/generate_descriptors.py "
                    f"{dataset} --similar` first."
                )
            pairs = [
                (f"{dataset}{ID_SEP}{c}{ID_SEP}{o}", comparative_prompt(c, o, rng))
                for o in similar[c]
            ]
        else:
            pairs = [(f"{dataset}{ID_SEP}{c}", plain_prompt(c, rng))]
        for custom_id, prompt in pairs:
            out.append(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": ENDPOINT,
                    "body": {
                        "model": model,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": MAX_TOKENS,
                    },
                }
            )
    return out


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# -- answers -------------------------------------------------------------------------------------


def descriptor_lines(content: str) -> list[str]:
    """The lines of an answer that begin with "- ", without the hyphen (upstream's parser)."""
    return [line[2:].strip() for line in content.split("\n") if line.startswith("- ")]


def parse_batch_output(
    lines: Iterable[str],
    classnames: Sequence[str] | None = None,
    similar: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """A Batch-API output file (JSONL) as `{class: [descriptor, ...]}`.

    Each class's descriptors are concatenated over its requests in the order of its similar
    classes (file order without `similar`); classes follow `classnames` (file order without it).

    Raises:
        StepError: some requests failed (error set or status not 200): a few ids, then a count.
    """
    answers: dict[str, dict[str, list[str]]] = {}
    failed: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        cid = row["custom_id"]
        response = row.get("response") or {}
        if row.get("error") or response.get("status_code", 200) != 200:
            failed.append(cid)
            continue
        content = response["body"]["choices"][0]["message"]["content"] or ""
        parts = cid.split(ID_SEP)
        c, other = parts[1], (parts[2] if len(parts) > 2 else "")
        answers.setdefault(c, {}).setdefault(other, []).extend(descriptor_lines(content))
    if failed:
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise StepError(
            f"{len(failed)} requests failed ({', '.join(failed[:3])}{more}); resubmit them or "
            "rerun --submit."
        )
    order = list(classnames) if classnames is not None else list(answers)
    out: dict[str, list[str]] = {}
    for c in order:
        per_other = answers.get(c, {})
        others = list(per_other)
        if similar and c in similar:
            rank = {o: i for i, o in enumerate(similar[c])}
            others.sort(key=lambda o: rank.get(o, len(rank)))
        out[c] = [d for o in others for d in per_other[o]]
    missing = [c for c in order if c not in answers]
    if missing:
        log.warning(
            "%d classes got no answer (e.g. %r): their lists are empty", len(missing), missing[0]
        )
    return out


# -- language models -----------------------------------------------------------------------------


def openai_client() -> Any:
    """An OpenAI client, or a one-line StepError naming what is missing."""
    if not os.environ.get("OPENAI_API_KEY"):
        raise StepError(
            "OPENAI_API_KEY is not set; export it and rerun, or generate with a local model "
            "(--hf-model <id>), or fetch the released files (--fetch <dataset>)."
        )
    try:
        import openai
    except ImportError as e:
        raise StepError("the `openai` package is not installed; run `pip install openai`.") from e
    return openai.OpenAI()


def submit_batch(client: Any, jsonl: Path) -> str:
    """Upload the request file and start a 24 h batch; returns the batch id."""
    with open(jsonl, "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
    )
    return str(batch.id)


def fetch_batch_output(client: Any, batch_id: str) -> str:
    """The output JSONL text of a completed batch (one-line StepError while it is not done)."""
    batch = client.batches.retrieve(batch_id)
    if batch.status != "completed":
        raise StepError(
            f"batch {batch_id} is {batch.status}, not completed; rerun this command later."
        )
    return client.files.content(batch.output_file_id).text


def run_local(requests: Sequence[dict[str, Any]], generate: Callable[[str], str]) -> list[str]:
    """Answer the requests with a local text generator, as Batch-API output lines."""
    out = []
    for req in requests:
        prompt = req["body"]["messages"][-1]["content"]
        text = generate(prompt)
        body = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        out.append(
            json.dumps(
                {
                    "custom_id": req["custom_id"],
                    "response": {"status_code": 200, "body": body},
                    "error": None,
                }
            )
        )
    return out


def hf_generator(model_id: str, max_new_tokens: int = 200) -> Callable[[str], str]:
    """Greedy local generation with a transformers text-generation pipeline (`--hf-model`)."""
    try:
        from transformers import pipeline

        pipe = pipeline("text-generation", model=model_id)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise StepError(
            f"cannot load {model_id} ({' '.join(str(e).split())[:160]}); "
            + (
                "HF_HUB_OFFLINE=1: download it on a machine with internet "
                f"(`huggingface-cli download {model_id}`) or unset HF_HUB_OFFLINE."
                if offline
                else "check the model id."
            )
        ) from e

    def generate(prompt: str) -> str:
        res = pipe(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
        text = res[0]["generated_text"] if res else ""
        return text.split("\nQ:")[0]  # a base model may go on with a question of its own

    return generate


# -- fetch ---------------------------------------------------------------------------------------


def upstream_url(dataset: str, kind: str) -> str:
    up = UPSTREAM_NAME[dataset]
    return (
        f"https://raw.githubusercontent.com/{UPSTREAM_REPO}/{UPSTREAM_COMMIT}/descriptors/"
        f"{UPSTREAM_FOLDER[kind]}/descriptors_{up}.json"
    )


def download(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise StepError(
            f"cannot download {url} ({getattr(e, 'reason', e)}); on a machine with internet run "
            "this command there and copy <root>/descriptors/ to this data root."
        ) from e


def rekey(
    table: dict[str, list[str]], classnames: Sequence[str], where: str
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The released table keyed by this project's class names, and a record of how.

    By name (case, underscores, word order ignored) when every class has a key; else by label
    position when the class counts agree (upstream files list classes in label order); else an error.
    Repeated class names (ImageNet's two "missile"s) keep the first list.
    """
    keys = list(table)
    by_name = match_keys(classnames, keys)
    if all(k is not None for k in by_name):
        pairs = list(zip(classnames, by_name, strict=True))
        how = "name"
    elif len(keys) == len(classnames):
        pairs = list(zip(classnames, keys, strict=True))
        how = "position"
    else:
        missing = [c for c, k in zip(classnames, by_name, strict=True) if k is None]
        raise StepError(
            f"{where} has {len(keys)} classes and the task {len(classnames)}, and {len(missing)} "
            f"task classes have no key (e.g. {missing[:3]}): the label spaces differ (upstream's "
            "FGVC-Aircraft is the 70 families, not the 100 variants); generate descriptors for "
            "this task instead."
        )
    out: dict[str, list[str]] = {}
    renamed: dict[str, str] = {}
    repeated: list[str] = []
    for c, k in pairs:
        if c in out:
            repeated.append(c)
            continue
        out[c] = list(table[k])  # type: ignore[index]
        if match_keys([c], [k])[0] is None:  # a different name, not just case or word order
            renamed[c] = k  # type: ignore[assignment]
    record = {"matched_by": how, "renamed": renamed, "repeated_names_keep_first": repeated}
    if how == "position":
        log.warning("%s: matched by label position; %d names differ", where, len(renamed))
    return out, record


def fetch(dataset: str, root: Path, kinds: Sequence[str] = KINDS) -> list[Path]:
    """Download the released descriptor files of `dataset` into `<root>/descriptors/<dataset>/`."""
    if dataset not in UPSTREAM_NAME:
        raise StepError(
            f"no released descriptors for {dataset}; upstream has {sorted(UPSTREAM_NAME)}. Generate "
            f"them: `python scripts/generate_descriptors.py {dataset} --similar`, then --submit."
        )
    classnames = classnames_of(dataset)
    written = []
    for kind in kinds:
        url = upstream_url(dataset, kind)
        table = json.loads(download(url).decode("utf-8"))
        out, record = rekey(table, classnames, url)
        path = descriptor_dir(dataset, root / "descriptors") / f"{kind}.json"
        write_descriptor_file(path, out)
        source = {"url": url, "repo": UPSTREAM_REPO, "commit": UPSTREAM_COMMIT, **record}
        path.with_suffix(".source.json").write_text(json.dumps(source, indent=2) + "\n")
        log.info("wrote %s (%d classes, matched by %s)", path, len(out), record["matched_by"])
        written.append(path)
    return written


# -- CLI -----------------------------------------------------------------------------------------


def _read_similar(folder: Path, dataset: str) -> dict[str, list[str]]:
    path = folder / SIMILAR_FILE
    if not path.is_file():
        raise StepError(
            f"{path} does not exist; run `python scripts/generate_descriptors.py {dataset} "
            "--similar` first."
        )
    return read_descriptor_file(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dataset", nargs="?", help="data config or dataset name")
    p.add_argument("--root", type=Path, default=Path(os.environ.get("DATA_ROOT", "data")))
    p.add_argument("--fetch", metavar="DATASET", help="download the released descriptor files")
    p.add_argument("--kind", choices=KINDS, default="comparative")
    p.add_argument("--similar", action="store_true", help="step 1: write similar_classes.json")
    p.add_argument("--n", type=int, default=None, help="similar classes per class (10; EuroSAT 9)")
    p.add_argument("--arch", default="ViT-B-32", help="open_clip text tower for --similar")
    p.add_argument("--pretrained", default="openai", help="its weights (tag or file)")
    p.add_argument("--cache-dir", default=os.environ.get("WEIGHTS_ROOT"))
    p.add_argument("--write-batch", action="store_true", help="write the Batch-API request JSONL")
    p.add_argument("--submit", action="store_true", help="write and submit the batch (OpenAI)")
    p.add_argument("--batch-id", help="download a completed batch's output and parse it")
    p.add_argument("--batch-output", type=Path, help="parse a downloaded batch output JSONL")
    p.add_argument("--hf-model", help="answer the requests with a local transformers model")
    p.add_argument("--llm", default=DEFAULT_LLM, help="model name in the requests (gpt-4o)")
    p.add_argument("--seed", type=int, default=42, help="few-shot draw seed")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if a.fetch:
            fetch(a.fetch, a.root)
            return 0
        if not a.dataset:
            p.error("give a DATASET (or --fetch DATASET)")
        folder = descriptor_dir(a.dataset, a.root / "descriptors")
        classnames = classnames_of(a.dataset)
        if a.similar:
            n = a.n or SIMILAR_N.get(a.dataset, DEFAULT_N)
            sim = similar_classes(classnames, n, a.arch, a.pretrained, a.cache_dir)
            path = write_descriptor_file(folder / SIMILAR_FILE, sim)
            log.info("wrote %s (%d classes, n=%d, %s/%s)", path, len(sim), n, a.arch, a.pretrained)
            return 0
        similar = _read_similar(folder, a.dataset) if a.kind == "comparative" else None
        out_path = folder / f"{a.kind}.json"
        if a.batch_output or a.batch_id:
            if a.batch_id:
                text = fetch_batch_output(openai_client(), a.batch_id)
                raw = folder / f"batch_{a.kind}_output.jsonl"
                raw.write_text(text, encoding="utf-8")
            else:
                text = a.batch_output.read_text(encoding="utf-8")
            table = parse_batch_output(text.splitlines(), classnames, similar)
            log.info("wrote %s", write_descriptor_file(out_path, table))
            return 0
        requests = batch_requests(a.dataset, a.kind, classnames, similar, a.seed, a.llm)
        if a.hf_model:
            lines = run_local(requests, hf_generator(a.hf_model))
            write_jsonl(folder / f"batch_{a.kind}_output.jsonl", (json.loads(x) for x in lines))
            table = parse_batch_output(lines, classnames, similar)
            log.info("wrote %s", write_descriptor_file(out_path, table))
            return 0
        jsonl = write_jsonl(folder / f"batch_{a.kind}.jsonl", requests)
        log.info("wrote %s (%d requests)", jsonl, len(requests))
        if a.submit or not a.write_batch:
            batch_id = submit_batch(openai_client(), jsonl)
            print(
                f"submitted batch {batch_id}; when it completes run `python scripts/"
                f"generate_descriptors.py {a.dataset} --kind {a.kind} --batch-id {batch_id}`"
            )
        return 0
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
