"""Chat text for fitting and checking token exits: the model's own answers to varied chat prompts.

WikiText-2 is encyclopedic prose; what a served chat model emits is its own answers to users (names,
lists, code, numbers). The tables must be fitted on, and checked against, text like that. No labels
are needed: the reference is the full model's greedy token, so the model writes the text itself,
offline, once (`generate_chat_text`), and every position of an answer is one teacher-forced sample.

The prompts are built from a seed (instruction templates x topics, plus AG News `test` articles to
summarise or question, which no head ever trains on) and split into disjoint train / calibration /
test prompts, so the promise is measured on prompts the tables never saw.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exitserve.models.llm.hidden_cache import HiddenCache
from exitserve.models.llm.llama import LlamaModel

TEMPLATES = (
    "What is {t}?", "Explain {t} to a ten-year-old.", "Give me three facts about {t}.",
    "Write a short poem about {t}.", "List five things people should know about {t}.",
    "Why is {t} important?", "Write a haiku about {t}.", "Describe the history of {t} in a few sentences.",
    "What are the pros and cons of {t}?", "Tell me a short story that involves {t}.",
    "How would you explain {t} in one sentence?", "What questions should I ask an expert on {t}?",
    "Compare {t} with something similar and explain the difference.", "Write a tweet about {t}.",
    "What is a common misconception about {t}?", "Summarize what you know about {t} in a paragraph.",
)
TOPICS = (
    "photosynthesis", "the French Revolution", "black holes", "machine learning", "the Roman Empire",
    "climate change", "the water cycle", "Python programming", "the stock market", "volcanoes",
    "the human heart", "jazz music", "the Moon landing", "electric cars", "the Great Wall of China",
    "vaccines", "the Internet", "Shakespeare", "the Amazon rainforest", "chess", "bees", "inflation",
    "the Olympic Games", "quantum computing", "coffee", "the solar system", "Mount Everest", "recycling",
    "the Renaissance", "earthquakes", "sleep", "the printing press", "DNA", "the Eiffel Tower",
    "renewable energy", "the piano", "democracy", "tea", "dinosaurs", "the Pacific Ocean", "football",
    "Albert Einstein", "Marie Curie", "Paris", "Tokyo", "Egypt's pyramids", "honey", "gravity",
    "the immune system", "video games", "baking bread", "the Moon", "Mars", "rainbows", "penguins",
    "Leonardo da Vinci", "the Industrial Revolution", "artificial intelligence", "the Nile", "Beethoven",
)
DIRECT = (
    "What is the capital of France?", "What is the capital of Japan?", "Who wrote Romeo and Juliet?",
    "Which planet is closest to the Sun?", "What is 12 times 7?", "How many continents are there?",
    "Name three colours.", "Translate 'good morning' into Spanish.", "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.", "What is the boiling point of water?",
    "Who painted the Mona Lisa?", "What is the largest mammal?", "How do I make a cup of tea?",
    "Give me a recipe for pancakes.", "What year did World War II end?", "What is the speed of light?",
    "Write a limerick about a cat.", "How many legs does a spider have?", "What is the square root of 144?",
    "Suggest a name for a pet goldfish.", "What language is spoken in Brazil?", "Who was the first person on the Moon?",
    "Write an email asking my manager for a day off.", "What are the primary colours?", "What is the capital of Italy?",
    "What is the chemical symbol for gold?", "Tell me a joke.", "How do airplanes stay in the air?",
    "Write a SQL query that counts the rows of a table named users.", "What is the tallest mountain in Africa?",
    "List the days of the week.", "What is the freezing point of water in Fahrenheit?", "Who discovered penicillin?",
)
NEWS_TASKS = ("Summarize this news in one sentence: {t}", "What is the main point of this article? {t}",
              "Who is mentioned in this text and why? {t}", "Rewrite this headline in plain words: {t}")


def chat_prompts(count: int, *, seed: int = 0, news: Path | None = None) -> list[str]:
    """`count` distinct user messages: fixed questions, template x topic, and (with `news`) AG News tasks."""
    rng = random.Random(seed)
    pool = [t.format(t=topic) for t in TEMPLATES for topic in TOPICS]
    rng.shuffle(pool)
    articles: list[str] = []
    if news is not None and news.is_file():
        rows = [line.split("\t", 1)[0] for line in news.read_text(encoding="utf-8").splitlines() if line.strip()]
        rng.shuffle(rows)
        articles = [rng.choice(NEWS_TASKS).format(t=text[:400]) for text in rows[: count // 4]]
    prompts = list(DIRECT) + articles + pool
    return prompts[:count] if count <= len(prompts) else prompts


def prompt_split(prompt: str) -> str:
    """A prompt's split, from its text (stable when the prompt list grows): 60 % train, 20 % each other."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 6 else "calibration" if bucket < 8 else "test"


@dataclass
class ChatText:
    """Rendered prompts and the full model's greedy answers to them (token ids)."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]

    def split(self, name: str) -> ChatText:
        keep = [i for i, p in enumerate(self.prompts) if prompt_split(p) == name]
        return ChatText([self.prompts[i] for i in keep], [self.prompt_ids[i] for i in keep],
                        [self.answer_ids[i] for i in keep])

    def answer_lengths(self) -> list[int]:
        """Tokens of each non-empty answer, in the order `cache_answers` lays them out."""
        return [len(a) for a in self.answer_ids if a]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"prompts": self.prompts, "prompt_ids": self.prompt_ids,
                                    "answer_ids": self.answer_ids}))

    @classmethod
    def load(cls, path: Path) -> ChatText:
        raw = json.loads(path.read_text())
        return cls(raw["prompts"], raw["prompt_ids"], raw["answer_ids"])


def generate_chat_text(gm, prompts: list[str], *, max_new: int = 96, batch: int = 16, log=print) -> ChatText:
    """Greedy full-depth answers of a `GenerationModel` to each prompt (its chat template), `batch` at a time."""
    if gm.chat_template is None:
        raise ValueError(f"{gm.name}: the bundle has no chat template")
    decoder = gm.decoder
    prompt_ids = [gm.encode(gm.chat_template.render([{"role": "user", "content": p}])) for p in prompts]
    answers: list[list[int]] = [[] for _ in prompts]
    start, done = time.perf_counter(), 0
    for first in range(0, len(prompts), batch):
        group = list(range(first, min(first + batch, len(prompts))))
        seqs = {i: decoder.new_sequence(prompt_ids[i], capacity=len(prompt_ids[i]) + max_new + 2, mode="full")
                for i in group}
        running = list(group)
        while running:
            outs = decoder.step([seqs[i] for i in running])
            for i, out in zip(list(running), outs, strict=True):
                for token in out:
                    answers[i].append(token.token)  # the end token too: predicting it is a sample
                    if token.token in gm.stop_ids or len(answers[i]) >= max_new:
                        running.remove(i)
                        decoder.release(seqs[i])  # its KV pool slot: the rest move down into it
                        break
        done += sum(len(answers[i]) for i in group)
        log(f"  chat answers: {group[-1] + 1}/{len(prompts)} prompts, {done} tokens, "
            f"{done / (time.perf_counter() - start):.0f} tokens/s")
    return ChatText(list(prompts), prompt_ids, answers)


@torch.inference_mode()
def cache_answers(model: LlamaModel, chat: ChatText, layers: list[int]) -> HiddenCache:
    """Hidden states at the positions that predict answer tokens (the last prompt token onwards),
    teacher-forced on prompt + answer; `full_argmax` is the full model's token there (= the answer,
    and the end token after the last one)."""
    last = model.config.num_layers - 1
    wanted = sorted(set(layers) | {last})
    total = sum(len(a) for a in chat.answer_ids)
    hidden = {layer: torch.empty(total, model.config.hidden_size, dtype=torch.float16) for layer in wanted}
    argmax = torch.empty(total, dtype=torch.int64)
    row = 0
    for prompt, answer in zip(chat.prompt_ids, chat.answer_ids, strict=True):
        if not answer:
            continue
        ids = np.asarray(prompt + answer[:-1], dtype=np.int64)
        logits, kept = model(torch.from_numpy(ids), hidden_layers=wanted)
        first, n = len(prompt) - 1, len(answer)
        for layer, h in zip(wanted, kept, strict=True):
            hidden[layer][row: row + n] = h[first: first + n]
        argmax[row: row + n] = logits[first: first + n].argmax(-1)
        row += n
    ids_all = np.concatenate([np.asarray(p + a, dtype=np.int64) for p, a in zip(chat.prompt_ids, chat.answer_ids,
                                                                              strict=True)])
    fingerprint = hashlib.sha256(ids_all.tobytes()).hexdigest()[:16]
    return HiddenCache(wanted, {k: v[:row] for k, v in hidden.items()}, argmax[:row], fingerprint)

