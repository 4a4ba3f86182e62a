"""Zero-shot CLIP tags (``use: clip_tags``): a cheap CPU recaptioner over a tag vocabulary.

Every tag of a vocabulary is embedded once per worker (prompt templates such as
``"a photo of {tag}"``, averaged: CLIP's prompt ensembling); each image is then
scored against all tags. Tags are compared *within their group* — a softmax of
``logit_scale × cosine`` over the alternatives of one question (which colour?
which background?), as in CLIP's zero-shot classification — so that a vocabulary
can mix questions without the biggest group crowding out the others. A tag is
kept when its probability in its group is at least ``min_prob``; at most
``top_k`` tags per image, most probable first.

Why groups: measured on a 400-sample demo world with the demo CLIP, one softmax
over all 65 demo tags picks colour-shape pairs first (48 of the 65 tags) and
reaches precision 0.34 at recall 0.33; the same model with one softmax per group
(colour, shape, colour-shape, background) and ``min_prob: 0.3`` reaches precision
0.70 at recall 0.49 (see the README).

Vocabulary file (``vocabulary: path``): one tag a line; blank lines and ``#``
comments are ignored; a line ``[name]`` starts a group. Tags before any header
form one group, so a plain list of tags (e.g. the demo world's ``tags.txt``) is
ordinary single-softmax zero-shot classification. ``curate demo`` writes the demo
world's vocabulary with its four groups as ``demo_vocabulary.txt``. A vocabulary
file that is not there is an :class:`~curate.errors.EnvironmentProblem`; one that
is wrong (a tag twice, an empty group) a :class:`~curate.errors.RecipeError` at its line.

Columns (dropped rows get nulls):

- ``clip_tags`` (list<string>), ``clip_tag_scores`` (list<float32>: the tags' probabilities
  in their groups), most probable first;
- ``recaption``: the tags composed into a caption (``recaption_template``, tags joined by
  ``", "`` in vocabulary order; a tag whose words all appear in another kept tag is left
  out: "red circle" already says "red"), null when no tag passed;
- ``recaption_model``: which model and vocabulary wrote it (the column the VLM recaptioner
  writes too);
- ``fused_caption``: rule-based fusion, as CapsFusion keeps the alt-text's knowledge —
  the original caption plus the tags it does not already mention (casefolded words, plurals
  as singulars: "two stars" mentions "star"; ``fuse_template``);
  the recaption alone when the caption is empty; the caption alone when the tags add nothing;
- ``train_caption``: the caption to train on, chosen by ``mode`` — the same option and
  columns as the VLM ``recaption`` stage: ``original``, ``recaption``, ``both``
  (``both: alternate`` picks one per sample by a stable hash of the key, ``both: join``
  joins them with ``join_separator``) or ``fuse`` (the default: a tag list alone is a poor
  caption, the alt-text plus missing tags is not).

The original ``caption`` column is never changed; to write the chosen caption as
``KEY.txt``, set ``write.caption_column: train_caption``.

Example::

    - use: clip_tags
      model: ViT-B-32
      pretrained: datacomp_xl_s13b_b90k
      vocabulary: tags.txt          # one tag a line, optional [group] headers
      top_k: 5
      min_prob: 0.3
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate import rows
from curate.errors import EnvironmentProblem, RecipeError
from curate.models.clip import preprocess_images
from curate.stages.base import Resources, Stage, StageConfig, StageContext, StageResult
from curate.stages.clip_score import INFERENCE_BATCH
from curate.stages.recaption import alternate_pick  # both stages split a corpus alike
from curate.stages.registry import register

log = logging.getLogger(__name__)

TAGS = "clip_tags"
TAG_SCORES = "clip_tag_scores"
RECAPTION = "recaption"
RECAPTION_MODEL = "recaption_model"
FUSED = "fused_caption"
TRAIN_CAPTION = "train_caption"

DEFAULT_GROUP = ""  # tags before any [group] header
DEFAULT_TEMPLATES = ("a photo of {tag}",)  # CLIP's own zero-shot prompt; ensembles average several
TAG_SEPARATOR = ", "
_GROUP_HEADER = re.compile(r"^\[([^\]]+)\]$")
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Vocabulary:
    """Tags in file order, and for each tag the index of its group (alternatives compete only there)."""

    tags: tuple[str, ...]
    groups: tuple[str, ...]
    group_of: tuple[int, ...]
    source: str

    def only(self, groups: list[str] | None) -> Vocabulary:
        """The vocabulary restricted to the named groups (all of them for None); unknown names are an error."""
        if groups is None:
            return self
        unknown = [g for g in groups if g not in self.groups]
        if unknown:
            raise RecipeError(f"clip_tags: groups {unknown} are not in {self.source} "
                              f"(it has: {', '.join(g or '(no header)' for g in self.groups)})")
        keep = [i for i, g in enumerate(self.group_of) if self.groups[g] in groups]
        names = tuple(g for g in self.groups if g in groups)
        return Vocabulary(tuple(self.tags[i] for i in keep), names,
                          tuple(names.index(self.groups[self.group_of[i]]) for i in keep), self.source)

    def group_members(self) -> list[list[int]]:
        members: list[list[int]] = [[] for _ in self.groups]
        for i, g in enumerate(self.group_of):
            members[g].append(i)
        return members


def parse_vocabulary(text: str, *, source: str) -> Vocabulary:
    """Parse the vocabulary file format (see the module docstring); errors name ``source:line``."""
    tags: list[str] = []
    groups: list[str] = []
    group_of: list[int] = []
    seen: dict[str, int] = {}
    current: int | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        header = _GROUP_HEADER.match(line)
        if header:
            name = header.group(1).strip()
            if name in groups:
                raise RecipeError(f"group [{name}] appears twice", file=source, line=lineno)
            groups.append(name)
            current = len(groups) - 1
            continue
        tag = " ".join(line.split())
        if tag in seen:
            raise RecipeError(f"tag {tag!r} is already on line {seen[tag]}", file=source, line=lineno)
        if current is None:
            groups.append(DEFAULT_GROUP)
            current = len(groups) - 1
        seen[tag] = lineno
        tags.append(tag)
        group_of.append(current)
    if not tags:
        raise RecipeError("the tag vocabulary is empty (one tag a line expected)", file=source)
    empty = [g for i, g in enumerate(groups) if i not in set(group_of)]
    if empty:
        raise RecipeError(f"group [{empty[0]}] has no tags", file=source)
    return Vocabulary(tuple(tags), tuple(groups), tuple(group_of), source)


def load_vocabulary(path: str) -> Vocabulary:
    """Read a vocabulary file (any fsspec path)."""
    import fsspec

    try:
        with fsspec.open(str(Path(path).expanduser()) if "://" not in path else path, "rt",
                         encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise EnvironmentProblem(f"clip_tags: vocabulary file not found: {path}") from e
    except UnicodeDecodeError as e:
        raise RecipeError(f"clip_tags: vocabulary {path} is not UTF-8 text: {e}") from e
    return parse_vocabulary(text, source=path)


def _singular(word: str) -> str:
    """A light English plural rule, enough for tag matching ("stars" mentions "star", "crosses" "cross")."""
    if len(word) > 4 and word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def words(text: str | None) -> set[str]:
    """Casefolded, singular words, for 'does the caption already mention this tag' checks."""
    return {_singular(w) for w in _WORD.findall((text or "").casefold())}


def drop_subsumed(tags: list[str]) -> list[str]:
    """Leave out tags whose words all appear in another tag of the list ("red" next to "red circle")."""
    tag_words = [words(t) for t in tags]
    return [t for i, t in enumerate(tags)
            if not any(j != i and tag_words[i] < tag_words[j] for j in range(len(tags)))]


def fuse(caption: str | None, tags: list[str], *, recaption: str | None, template: str) -> str | None:
    """Original caption + the tags it does not mention; the recaption when there is no caption."""
    if not (caption or "").strip():
        return recaption
    said = words(caption)
    new = [t for t in drop_subsumed(tags) if not words(t) <= said]
    if not new:
        return caption
    return template.format(caption=caption.strip(), tags=TAG_SEPARATOR.join(new))


class ClipTagsConfig(StageConfig):
    use: Literal["clip_tags"] = "clip_tags"
    model: str = Field("ViT-B-32", description="open_clip architecture, or curate-demo-clip.")
    pretrained: str | None = Field("datacomp_xl_s13b_b90k", description="Pretrained tag or checkpoint path.")
    vocabulary: str = Field(description="Tag file (any fsspec path): one tag a line, `[group]` headers, "
                                        "`#` comments.")
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1,
                                 description="Prompt templates with `{tag}`; embeddings are averaged.")
    groups: list[str] | None = Field(None, min_length=1, description="Use only these [group]s of the "
                                     "vocabulary (e.g. the ones the model is reliable on); default: all.")
    top_k: int = Field(5, ge=1, description="At most this many tags per image, most probable first.")
    min_prob: float = Field(0.3, ge=0, le=1, description="Keep a tag whose softmax probability within its "
                                                         "group is at least this.")
    logit_scale: float | None = Field(None, gt=0, description="Softmax scale on cosine similarity; "
                                                              "default: the model's learned logit scale.")
    recaption_template: str = Field("{tags}", description="Caption made of the tags; `{tags}` is "
                                                          "the comma-separated tags.")
    fuse_template: str = Field("{caption}, {tags}", description="Fused caption; `{caption}` is the "
                                                                "original, `{tags}` the tags it lacks.")
    text_column: str = Field("caption", description="The original caption fused with the tags.")
    mode: Literal["original", "recaption", "both", "fuse"] = Field(
        "fuse", description="Which caption goes in train_caption (as the recaption stage).")
    both: Literal["alternate", "join"] = Field("alternate", description="mode both: one of the two per "
                                                "sample by key hash, or both joined.")
    join_separator: str = "\n"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    inference_batch: int = Field(INFERENCE_BATCH, ge=1)
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=1, num_gpus=1))

    @field_validator("templates")
    @classmethod
    def _templates_have_tag(cls, v: list[str]) -> list[str]:
        for t in v:
            _check_template(t, {"tag"}, "templates")
        return v

    @model_validator(mode="after")
    def _check(self) -> ClipTagsConfig:
        if self.model == "curate-demo-clip" and self.pretrained == "datacomp_xl_s13b_b90k":
            self.pretrained = None  # the demo model's own checkpoint
        _check_template(self.recaption_template, {"tags"}, "recaption_template")
        _check_template(self.fuse_template, {"caption", "tags"}, "fuse_template")
        return self


def _check_template(template: str, fields: set[str], option: str) -> None:
    import string

    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"{option}: {template!r} is not a format string: {e}") from None
    if used != fields:
        raise ValueError(f"{option}: {template!r} must use exactly {', '.join('{' + f + '}' for f in sorted(fields))}")


@register
class ClipTags(Stage[ClipTagsConfig]):
    name = "clip_tags"
    Config = ClipTagsConfig
    stateful = True
    output_columns = {TAGS: pa.list_(pa.string()), TAG_SCORES: pa.list_(pa.float32()),
                      RECAPTION: pa.string(), RECAPTION_MODEL: pa.string(), FUSED: pa.string(),
                      TRAIN_CAPTION: pa.string()}

    def check(self) -> None:
        """Fail before any work if the checkpoint or the vocabulary is not available here."""
        from curate.models.clip import resolve_checkpoint

        resolve_checkpoint(self.config.model, self.config.pretrained)
        load_vocabulary(self.config.vocabulary).only(self.config.groups)

    def setup(self, ctx: StageContext) -> None:
        import torch

        from curate.models.clip import load_clip_for_worker

        cfg = self.config
        self.model, self.preprocess, tokenizer, self.device, self.dtype = load_clip_for_worker(
            cfg.model, cfg.pretrained, cfg.device, cfg.precision)
        device = self.device
        self.vocab = load_vocabulary(cfg.vocabulary).only(cfg.groups)
        self.tag_index = {t: i for i, t in enumerate(self.vocab.tags)}
        self.scale = float(cfg.logit_scale if cfg.logit_scale is not None else self.model.logit_scale.exp().item())
        self.text_emb = self._embed_tags(tokenizer)
        self.members = [torch.tensor(m, device=device) for m in self.vocab.group_members()]
        self.model_tag = f"clip_tags:{cfg.model}/{cfg.pretrained or 'demo'}+{Path(cfg.vocabulary).name}"
        log.info("clip_tags: %s/%s on %s, %d tags in %d groups, scale %.1f", cfg.model, cfg.pretrained,
                 device, len(self.vocab.tags), len(self.vocab.groups), self.scale)

    def _embed_tags(self, tokenizer):
        """One normalised text embedding per tag: the mean of its templates' embeddings (prompt ensembling)."""
        import torch

        cfg = self.config
        out = []
        with torch.inference_mode():
            for start in range(0, len(self.vocab.tags), cfg.inference_batch):
                chunk = self.vocab.tags[start:start + cfg.inference_batch]
                prompts = [t.format(tag=tag) for tag in chunk for t in cfg.templates]
                emb = torch.nn.functional.normalize(
                    self.model.encode_text(tokenizer(prompts).to(self.device)).float(), dim=-1)
                emb = emb.view(len(chunk), len(cfg.templates), -1).mean(1)
                out.append(torch.nn.functional.normalize(emb, dim=-1))
        return torch.cat(out)

    def tag_probabilities(self, image_emb):
        """(images × tags) probabilities: softmax of scale × cosine within each tag's group."""
        import torch

        logits = self.scale * (image_emb @ self.text_emb.T)
        probs = torch.empty_like(logits)
        for idx in self.members:
            probs[:, idx] = logits[:, idx].softmax(-1)
        return probs

    def process(self, batch: pa.Table) -> StageResult:
        import torch

        cfg = self.config
        images = batch[rows.IMAGE].to_pylist()
        n = len(images)
        captions = (batch[cfg.text_column].to_pylist() if cfg.text_column in batch.column_names
                    else [None] * n)
        tags: list[list[str] | None] = [None] * n
        scores: list[list[float] | None] = [None] * n
        ok, tensors, drop = preprocess_images(images, self.preprocess)
        for start in range(0, len(ok), cfg.inference_batch):
            idx = ok[start:start + cfg.inference_batch]
            imgs = torch.stack(tensors[start:start + cfg.inference_batch]).to(self.device, self.dtype)
            with torch.inference_mode():
                fi = torch.nn.functional.normalize(self.model.encode_image(imgs).float(), dim=-1)
                probs = self.tag_probabilities(fi).cpu()
            top_p, top_i = probs.topk(min(cfg.top_k, probs.shape[1]), dim=-1)
            for j, i in enumerate(idx):
                keep = [(self.vocab.tags[t], float(p)) for p, t in zip(top_p[j].tolist(), top_i[j].tolist(),
                                                                       strict=True) if p >= cfg.min_prob]
                tags[i] = [t for t, _ in keep]
                scores[i] = [p for _, p in keep]
        recaptions: list[str | None] = [None] * n
        fused: list[str | None] = [None] * n
        train: list[str | None] = [None] * n
        keys = batch[rows.KEY].to_pylist()
        models: list[str | None] = [None] * n
        for i in ok:
            # Composed in vocabulary order (colour before background, say), which reads better
            # than probability order; clip_tags keeps the probability order.
            in_order = sorted(tags[i] or [], key=self.tag_index.__getitem__)
            if in_order:
                recaptions[i] = cfg.recaption_template.format(tags=TAG_SEPARATOR.join(drop_subsumed(in_order)))
                models[i] = self.model_tag
            fused[i] = fuse(captions[i], in_order, recaption=recaptions[i], template=cfg.fuse_template)
            train[i] = self._choose(keys[i], captions[i], recaptions[i], fused[i])
        return StageResult(columns={
            TAGS: pa.array(tags, pa.list_(pa.string())),
            TAG_SCORES: pa.array(scores, pa.list_(pa.float32())),
            RECAPTION: pa.array(recaptions, pa.string()),
            RECAPTION_MODEL: pa.array(models, pa.string()),
            FUSED: pa.array(fused, pa.string()),
            TRAIN_CAPTION: pa.array(train, pa.string()),
        }, drop=drop)

    def _choose(self, key: str, caption: str | None, recap: str | None, fused: str | None) -> str | None:
        """The training caption by ``mode``; falls back to the alt-text when no tag passed."""
        cfg = self.config
        if cfg.mode == "original":
            return caption
        if cfg.mode == "recaption":
            return recap or caption
        if cfg.mode == "fuse":
            return fused
        if cfg.both == "join":
            return cfg.join_separator.join(t for t in (caption, recap) if t)
        return recap if (alternate_pick(key) and recap) or not caption else caption

