"""Forget and behaviour edits on a real model (SmolLM2-135M-Instruct), through the
daemon's dispatch with the default MELO settings: a chat-form identity edit answers in
chat, a forget of what the model knows withholds it while another question about the
same person keeps its answer (scope "prompt"), and retracting both gives the base
model's outputs back exactly."""

from __future__ import annotations

from pathlib import Path

from daemon.config import Config, ModelConfig, RouterConfig, StoreConfig
from daemon.eval.behaviour import behaviour_request
from daemon.eval.routed import apply_in_sequence, build_routed_editor, retract_all
from daemon.model.answers import reply_mentions
from daemon.model.chat import chat_prompt
from daemon.model.loading import load_model
from store.records import EditKind, EditRequest


def test_identity_and_forget_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    cfg = Config(
        model=ModelConfig(name_or_path=str(smollm2_dir), device="cpu"),
        store=StoreConfig(path=tmp_path / "editd.sqlite3"),
        router=RouterConfig(backends=("melo",)),
    )
    loaded = load_model(str(smollm2_dir), device="cpu")
    engine = build_routed_editor(loaded, cfg).engine
    tok = loaded.tokenizer
    who = chat_prompt(tok, "Who are you?")
    unrelated = chat_prompt(tok, "Give me a recipe for pancakes.")
    fact = "The mother tongue of Danielle Darrieux is"
    same_person = "Danielle Darrieux is a famous"
    probes = [who, unrelated, fact, same_person]
    base = engine.greedy(probes, 12)
    assert reply_mentions(base[2], " French") and not reply_mentions(base[0], "Ada")

    identity = behaviour_request("who", who, " I am Ada, kept up to date by editd.")
    forget = EditRequest(
        prompt=fact,
        target=cfg.kinds.withheld_answer,
        id="forget",
        subject="Danielle Darrieux",
        kind=EditKind.FORGET,
    )
    done = apply_in_sequence(engine, [identity, forget], cfg.router)
    assert done.applied_by == {"melo": 2}, done.failed
    withheld = done.results[1].withheld["forget"]
    assert withheld.strip() == "French"  # read from the model just before the edit
    now = engine.greedy(probes, 12)
    assert now[0] == identity.target  # a chat prompt's target is the whole turn: it ends
    assert now[1] == base[1]  # an unrelated chat turn is untouched
    assert not reply_mentions(now[2], withheld)
    assert now[2] == cfg.kinds.withheld_answer  # said once: a forget's target ends the reply
    assert now[3] == base[3]  # the person's other questions keep their answers

    retract_all(engine, [identity, forget])
    assert engine.greedy(probes, 12) == base
