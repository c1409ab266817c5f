"""lm-evaluation-harness's `local-completions` model against `fastgpt2 serve`: a small local task
(JSONL documents of short English prose and task YAMLs the test writes) run through lm-eval gives, per
sample, the numbers fastgpt2 computes in process on the same checkpoint: each loglikelihood request's
sum of log-softmax over its continuation's tokens and whether those tokens are the greedy ones
(multiple choice), each greedy generation cut at the task's `until` strings (generate_until), and the
aggregate metrics; with lm-eval's batch size 1 (one prompt per request) and 4 (several per request).

The checkpoint: the serve tests' tiny GPT-2 (its random weights predict one token after any prompt,
which would make every generation the same string and no continuation greedy) fine-tuned here for a
few seconds on the documents, each ended by the model's EOS as GPT-2's training text is. Its greedy
generations then differ from document to document and some stop at an `until` string, and some scored
continuations are greedy, some not. Scoring a whole document, whose greedy next token is EOS, counts
every token of it: the server keeps a stop token in the logprobs (not in the text), and lm-eval reads
the prompt's entries up to that last, generated, one.
"""
import json
import shutil
from importlib.util import find_spec

import pytest
import torch

import fastgpt2
from fastgpt2.runtime.tokenizer import load_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is in the test extra")
from test_server import NAME, _start, _stop  # noqa: E402  (the serve tests' server helpers)

DOCS = [
    "The river ran past the old mill and under the stone bridge.",
    "Every morning the baker lit the oven before the town woke up.",
    "A small boat waited at the dock, its sail folded and wet.",
    "The children planted beans in the garden behind the school.",
    "Snow fell on the hills all night, and the roads were closed.",
    "My aunt keeps her letters in a blue tin under the stairs.",
    "The train to the coast leaves at noon from the second platform.",
    "An owl sat on the fence and watched the field in the dark.",
    "We painted the kitchen yellow and hung new curtains by the door.",
    "The old clock in the hall stopped at a quarter past three.",
]
UNTIL, MAX_GEN_TOKS = [".", ","], 8


def _multiple_choice_docs():
    """Doc i: its first 3 + i % 4 words; choices: its next two words and the two words at that place
    in two other documents (never a document's end); the answer at index i % 3."""
    words = [d.split() for d in DOCS]
    out = []
    for i in range(len(DOCS)):
        k = 3 + i % 4
        spans = [" ".join(words[j][k:k + 2]) for j in (i, (i + 3) % len(DOCS), (i + 7) % len(DOCS))]
        choices = spans[1:]
        choices.insert(i % 3, spans[0])
        out.append({"context": " ".join(words[i][:k]), "choices": choices, "label": i % 3})
    return out


def _generation_docs():
    """Doc i: all but its last 1 + i % 3 words; the answer: the rest, before the final full stop."""
    out = []
    for text in DOCS:
        words = text.split()
        k = len(words) - 1 - len(out) % 3
        out.append({"prompt": " ".join(words[:k]), "answer": " " + " ".join(words[k:]).rstrip(".")})
    return out


def _whole_docs():
    """Doc i: its first 3 words; the continuation: the rest of the document, to its end."""
    return [{"context": " ".join(d.split()[:3]), "continuation": " " + " ".join(d.split()[3:])} for d in DOCS]


TASKS = {
    "fastgpt2_mc": (_multiple_choice_docs, """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""),
    "fastgpt2_gen": (_generation_docs, f"""
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(UNTIL)}
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""),
    "fastgpt2_whole": (_whole_docs, """
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{continuation}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""),
}


def _write_tasks(directory):
    for name, (docs, body) in TASKS.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs()))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}")


def _fine_tune(checkpoint, directory, steps=60):
    """The checkpoint trained on DOCS (each ended by EOS) with Adam, saved with its tokenizer. Its
    layernorms' biases start at zero (the random ones, near 1, hold every position's hidden state near
    one vector, which slows training to a crawl)."""
    from transformers import GPT2LMHeadModel

    tok = load_tokenizer(checkpoint)
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()  # eval: no dropout
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith(".bias"):
                p.zero_()
    eos = model.config.eos_token_id
    rows = [tok.encode(d).ids + [eos] for d in DOCS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(directory)
    shutil.copy(checkpoint / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """The fine-tuned checkpoint, served: (its directory, the tasks' directory, the server's URL)."""
    missing = [m for m in ("tenacity", "aiohttp", "requests") if find_spec(m) is None]
    if missing:
        pytest.fail(f"lm-eval's API models (local-completions) need its [api] extra: {missing} missing; the "
                    "test extra should name lm-eval[api]", pytrace=False)
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = _fine_tune(checkpoint, root / "model")
    tasks_dir = root / "tasks"
    tasks_dir.mkdir()
    _write_tasks(tasks_dir)
    proc, url = _start(model_dir)
    try:
        yield model_dir, tasks_dir, url
    finally:
        _stop(proc)


@pytest.fixture(scope="module", params=[1, 4], ids=lambda b: f"batch_size={b}")
def evaluated(served, request):
    """lm-eval's simple_evaluate of the tasks through the server, one request at a time (num_concurrent
    1: lm-eval posts with `requests`, recorded here): (checkpoint directory, results, the request
    bodies, the batch size)."""
    import lm_eval.models.api_models as api_models
    import requests

    model_dir, tasks_dir, url = served
    batch_size = request.param
    sent = []

    def post(url, json=None, **kwargs):
        sent.append(json)
        return requests.post(url, json=json, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(api_models, "requests", type("Recorded", (), {"post": staticmethod(post)}))
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{url}/v1/completions", "model": NAME, "tokenizer_backend": "huggingface",
                        "tokenizer": str(model_dir), "num_concurrent": 1, "max_retries": 1,
                        "batch_size": batch_size, "max_length": 128, "tokenized_requests": True, "timeout": 60},
            tasks=list(TASKS), task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks_dir)),
            log_samples=True, cache_requests=False)
    return model_dir, results, sent, batch_size


def _encode_pair(tok, context, continuation):
    """lm-eval's tokenization of a (context, continuation) request (TemplateLM._encode_pair): the
    context's trailing spaces move to the continuation; the continuation's tokens are those of the
    whole text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode(context + continuation).ids, tok.encode(context).ids
    return ctx, whole[len(ctx):]


def _scored(model, tok, context, continuation):
    """fastgpt2's own (loglikelihood, is_greedy) of a request, its token ids, and the greedy token
    after them: one forward over context + continuation."""
    ctx, cont = _encode_pair(tok, context, continuation)
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), -1)
    picked, target = lp[len(ctx) - 1:-1], torch.tensor(cont)
    ll = float(picked.gather(1, target[:, None]).sum())
    return ll, bool((picked.argmax(-1) == target).all()), ctx + cont, int(lp[-1].argmax())


def _by_doc(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(DOCS)))
    return samples


def test_loglikelihoods_and_generations_equal_fastgpt2_in_process(evaluated):
    model_dir, results, sent, batch_size = evaluated
    model = fastgpt2.GPT2.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    eos = model.config.eos_token_id
    prompts = []  # every prompt lm-eval should have sent, as fastgpt2's tokenizer makes it

    # multiple choice: each choice's (loglikelihood, is_greedy)
    correct, correct_norm, greedy = [], [], []
    for sample in _by_doc(results, "fastgpt2_mc"):
        doc = sample["doc"]
        assert [tuple(a) for a in sample["arguments"]] == [(doc["context"], " " + c) for c in doc["choices"]]
        lls = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ll, is_greedy, ids, after = _scored(model, tok, context, continuation)
            prompts.append(ids)
            assert abs(resp[0][0] - ll) < 1e-4 and resp[0][1] == is_greedy, (
                sample["doc_id"], context, continuation, "lm-eval:", resp[0], "fastgpt2:", (ll, is_greedy),
                f"the greedy token after the request: {after} (EOS: {eos})")
            lls.append(ll)
            greedy.append(is_greedy)
        correct.append(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
        by_bytes = [ll / len((" " + c).encode()) for ll, c in zip(lls, doc["choices"])]
        correct_norm.append(max(range(len(lls)), key=by_bytes.__getitem__) == doc["label"])
    metrics = results["results"]["fastgpt2_mc"]
    assert metrics["acc,none"] == pytest.approx(sum(correct) / len(DOCS), abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(sum(correct_norm) / len(DOCS), abs=1e-12)
    assert any(greedy) and not all(greedy), greedy  # both kinds of continuation were scored

    # generate_until: greedy (EOS ends it), cut at the first `until` string
    texts, matches, stopped = [], [], 0
    for sample in _by_doc(results, "fastgpt2_gen"):
        context, kwargs = sample["arguments"][0]
        assert context == sample["doc"]["prompt"] and kwargs["until"] == UNTIL
        ids = tok.encode(context).ids
        prompts.append(ids)
        out = model.generate(torch.tensor([ids]), MAX_GEN_TOKS, eos_token_id=eos)[0, len(ids):].tolist()
        text = tok.decode([t for t in out if t != eos])
        cut = min((i for i in (text.find(s) for s in UNTIL) if i >= 0), default=len(text))
        stopped += cut < len(text)
        assert sample["resps"][0][0] == text[:cut], (sample["doc_id"], context, "lm-eval:", sample["resps"],
                                                     "fastgpt2 (before the cut):", text)
        texts.append(text[:cut])
        matches.append(text[:cut] == sample["target"])
    assert results["results"]["fastgpt2_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(DOCS))
    assert len(set(texts)) > len(DOCS) // 2 and stopped > 0, texts  # varied, and `until` cut some

    # the requests: token-id prompts, up to batch_size per request, in local-completions' two shapes
    scored = [b for b in sent if b.get("echo")]
    generated = [b for b in sent if not b.get("echo")]
    assert all(b["max_tokens"] == 1 and b["logprobs"] == 1 and b["temperature"] == 0 for b in scored)
    assert all(b["max_tokens"] == MAX_GEN_TOKS and b["temperature"] == 0 and set(UNTIL) <= set(b["stop"])
               for b in generated)
    sizes = [len(b["prompt"]) for b in sent]
    assert max(sizes) == batch_size and all(1 <= n <= batch_size for n in sizes), sizes
    for sample in _by_doc(results, "fastgpt2_whole"):  # (its numbers: the test below)
        prompts.append(sum(_encode_pair(tok, *sample["arguments"][0]), []))
    assert sorted(p for b in sent for p in b["prompt"]) == sorted(prompts)  # lm-eval's tokenization is ours


def test_scoring_a_whole_document_counts_its_last_token(evaluated):
    """A continuation that ends a document, where the fine-tuned model's greedy next token is EOS:
    lm-eval's loglikelihood should equal fastgpt2's own, as for any other continuation."""
    model_dir, results, _, _ = evaluated
    model = fastgpt2.GPT2.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    samples = _by_doc(results, "fastgpt2_whole")
    scored = [(s, _scored(model, tok, *s["arguments"][0])) for s in samples]
    at_eos = sum(after == model.config.eos_token_id for _, (_, _, _, after) in scored)
    if not at_eos:
        pytest.fail("no document's greedy next token is EOS: this test no longer covers that case")
    for sample, (ll, is_greedy, _, after) in scored:
        got_ll, got_greedy = sample["resps"][0][0]
        assert abs(got_ll - ll) < 1e-4 and got_greedy == is_greedy, (
            sample["doc_id"], "lm-eval:", (got_ll, got_greedy), "fastgpt2:", (ll, is_greedy),
            f"the greedy token after it: {after} (EOS: {model.config.eos_token_id})")
