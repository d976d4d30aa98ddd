"""The instruction prompts for distillation, built here from our own templates (no public benchmark questions).

`build_prompts(seed)` returns several thousand distinct prompts across nine categories, deterministic for a seed
(and, for the "docs" category, for the documentation installed on the machine). Every prompt has a stable id
(`<category>-<12 hex of sha1(messages)>`) and a split: ~3% `eval` (by a hash of the id, never trained on), rest
`train`. The list is ordered so that categories are interleaved in proportion to their size: stopping the
generation job at any point leaves a balanced set. Category "selfq" is lazy: its messages ask the target to write
a question, and the generation job asks the target that question.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field

from tandem_tools.distill.sources import documentation_paragraphs, stdlib_signatures
from tandem_tools.distill.tasks import code_task, math_problem, reasoning_puzzle

from . import vocab as v

EVAL_PER_MILLE = 30
Content = str | list[dict[str, str]]
COUNTS = {
    "writing": 1200,
    "questions": 1300,
    "docs": 800,
    "translation": 700,
    "math": 900,
    "reasoning": 700,
    "code": 1000,
    "multiturn": 700,
    "selfq": 600,
}


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    split: str  # "train" | "eval"
    messages: list[dict[str, str]] = field(hash=False)
    lazy: bool = False  # selfq: `messages` ask for a question; the generated question becomes the user prompt


def hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def split_of(prompt_id: str) -> str:
    return "eval" if hash_int("split:" + prompt_id) % 1000 < EVAL_PER_MILLE else "train"


def make_prompt(category: str, messages: list[dict[str, str]]) -> Prompt:
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    pid = f"{category}-{digest}"
    return Prompt(pid, category, split_of(pid), messages, lazy=category == "selfq")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def writing(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return (
            f"Write a {rng.choice(v.TONES)} email to {rng.choice(v.RECIPIENTS)} {rng.choice(v.EMAIL_PURPOSES)}. "
            f"Keep it {rng.choice(v.LENGTHS)}."
        )
    if kind == 1:
        return (
            f"Write a short {rng.choice(v.GENRES)} story about {rng.choice(v.CHARACTERS)} who "
            f"{rng.choice(v.EVENTS)}{rng.choice(v.SETTINGS)}. Tell it {rng.choice(v.LENGTHS)}."
        )
    if kind == 2:
        return f"Write a {rng.choice(v.POEM_FORMS)} about {rng.choice(v.POEM_SUBJECTS)}{rng.choice(v.POEM_MOODS)}."
    if kind == 3:
        return (
            f"Write a product description for {rng.choice(v.PRODUCTS)}, aimed at {rng.choice(v.AUDIENCES)}"
            f"{rng.choice(v.EMPHASES)}. Keep it {rng.choice(v.LENGTHS)}."
        )
    return rng.choice(
        (
            f"Write a {rng.choice(v.TONES)} toast for {rng.choice(v.OCCASIONS)}.",
            f"Write three catchy slogan ideas for {rng.choice(v.PRODUCTS)}.",
            f"Write a {rng.choice(v.TONES)} social media post announcing {rng.choice(v.OCCASIONS)}.",
            f"Write a customer review of {rng.choice(v.PRODUCTS)} as told by {rng.choice(v.CHARACTERS)}.",
        )
    )


QUESTION_TEMPLATES = {
    "science": ("Tell me about {}.", "Explain {} in simple terms.", "How do scientists study {}?",
                "What are common misconceptions about {}?", "Give me three interesting facts about {}.",
                "How would you explain {} to a ten-year-old?"),
    "history": ("What caused {}?", "What were the consequences of {}?", "Why does {} still matter today?",
                "Describe {} in a short paragraph.", "Who were the key people involved in {}?",
                "What was daily life like at the time of {}?"),
    "everyday": ("What are some tips for {}?", "What mistakes do beginners make when {}?",
                 "Give me a simple step-by-step plan for {}.", "How can I get better at {}?",
                 "What should I know before {}?"),
    "machines": ("How does {} work?", "What are the main parts of {} and what does each do?",
                 "How has {} changed over the last fifty years?", "What can go wrong with {}, and how is it fixed?",
                 "Explain how {} works to someone with no technical background."),
    "society": ("Tell me about {}.", "What are the pros and cons of {}?", "How does {} affect ordinary people?",
                "Explain {} with a simple example."),
}  # fmt: skip
QUESTION_TOPICS = {
    "science": v.SCIENCE,
    "history": v.HISTORY,
    "everyday": v.EVERYDAY,
    "machines": v.MACHINES,
    "society": v.SOCIETY,
}


QUESTION_STYLES = (
    "",
    " Keep the answer under 100 words.",
    " Use an analogy.",
    " Answer as a numbered list.",
    " Answer in one paragraph.",
    " Be precise.",
)


def question(rng: random.Random) -> str:
    domain = rng.choice(sorted(QUESTION_TOPICS))
    text = rng.choice(QUESTION_TEMPLATES[domain]).format(rng.choice(QUESTION_TOPICS[domain]))
    return text + rng.choice(QUESTION_STYLES)


DOC_TASKS = (
    "Summarise the following passage in two or three sentences.",
    "Explain the following text to a beginner, in plain language.",
    "What are the key points of this passage? Answer as a short bulleted list.",
    "Write a one-line title for this passage, then a one-paragraph summary.",
    "Read the passage and list two questions it answers, with their answers.",
)


def docs_prompts(rng: random.Random, per_source: int = 12) -> list[str]:
    """One task per documentation paragraph, at most `per_source` paragraphs per package/module."""
    by_source: dict[str, list[str]] = defaultdict(list)
    for source, para in documentation_paragraphs():
        by_source[source.split("/")[0].split(".")[0]].append(para)
    out = []
    for source in sorted(by_source):
        paras = by_source[source]
        for para in rng.sample(paras, min(per_source, len(paras))):
            out.append(f"{rng.choice(DOC_TASKS)}\n\n{para}")
    rng.shuffle(out)
    return out


SENTENCES = (
    ("I would like to {} {}.", ("visit the museum", "buy some fresh bread", "learn to play the guitar",
                                "book a table for two", "rent a bicycle"), ("tomorrow", "next weekend", "after work")),
    ("My {} {} every {}.", ("sister", "father", "grandmother", "neighbour", "best friend"),
     ("reads the newspaper", "walks the dog", "drinks green tea", "cooks dinner", "goes swimming")),
    ("Where is the nearest {}?", ("train station", "pharmacy", "bank", "post office", "bakery", "bus stop"), ()),
    ("Could you please {}?", ("close the window", "speak a little more slowly", "help me carry these bags",
                              "send me the address", "repeat the question", "turn off the lights"), ()),
    ("It is {} today, so we {}.", ("raining", "sunny", "very cold", "windy", "snowing"),
     ("will stay at home", "are going to the beach", "will take the car", "are having lunch in the park")),
    ("We visited {} {}.", ("our grandparents", "an old castle", "a small island", "the city market"),
     ("last summer", "two years ago", "on Saturday")),
    ("How much does {} cost?", ("this jacket", "a ticket to the city centre", "a cup of coffee", "the blue umbrella"),
     ()),
    ("The {} at this restaurant {}.", ("soup", "bread", "fish", "dessert"),
     ("is delicious", "is too salty", "comes with a salad", "is made fresh every morning")),
)  # fmt: skip
EVERY = ("morning", "evening", "Sunday", "weekend")
TRANSLATE = (
    "Translate into {lang}: {text}",
    'How do you say "{text}" in {lang}?',
    "Translate the following from English to {lang}.\n\n{text}",
    "Please give the {lang} translation of this sentence: {text}",
)


def _sentence(rng: random.Random) -> str:
    template, first, second = rng.choice(SENTENCES)
    if template.startswith("My"):
        return template.format(rng.choice(first), rng.choice(second), rng.choice(EVERY))
    return template.format(rng.choice(first), *([rng.choice(second)] if second else []))


def translation(rng: random.Random) -> str:
    text = _sentence(rng) if rng.random() < 0.7 else f"{_sentence(rng)} {_sentence(rng)}"
    return rng.choice(TRANSLATE).format(lang=rng.choice(v.TRANSLATION_LANGUAGES), text=text)


DIALOGUES = (
    ("I'm planning a trip to {place} for {n} days.", "That sounds exciting! What kind of things do you enjoy doing?",
     ("I like {interest}. What would you suggest?", "Can you make it into a day-by-day plan?")),
    ("Can you help me understand {topic}?", "Of course. Which part would you like to start with?",
     ("Start with the basics, please.", "Can you give me a real-world example?")),
    ("I want to start cooking at home more often.", "Great idea! How much time do you usually have on weekdays?",
     ("About {mins} minutes. What are some easy dinners?", "Which of those can I prepare in advance?")),
    ("I need to write a {doc}.", "Happy to help. Who is it for, and what should it achieve?",
     ("It's for {who}. Can you draft it?", "Make it a bit shorter and friendlier.")),
    ("I'm learning Python.", "Nice! What have you covered so far?",
     ("Just variables and loops. What should I learn next?", "Can you give me a small exercise for that?")),
    ("What is {topic}?", "It's a big subject. Do you want a short overview or a detailed explanation?",
     ("A short overview, please.", "Now explain why it matters.")),
    ("I keep feeling tired in the afternoons.", "Sorry to hear that. How many hours do you usually sleep?",
     ("About {hours} hours. What could I change?", "What should I eat for lunch to help?")),
)  # fmt: skip
FILL = {
    "place": ("Lisbon", "Kyoto", "the Scottish Highlands", "Mexico City", "Cape Town", "Vancouver", "Istanbul"),
    "n": ("three", "five", "seven", "ten"),
    "interest": ("museums and history", "hiking", "street food", "architecture", "quiet beaches"),
    "topic": v.SCIENCE + v.SOCIETY,
    "mins": ("20", "30", "45"),
    "doc": ("cover letter", "complaint letter", "wedding speech", "project update", "thank-you note"),
    "who": ("a hiring manager", "my landlord", "my team", "my old teacher"),
    "hours": ("five", "six", "seven"),
}


def multiturn(rng: random.Random) -> list[dict[str, str]]:
    first, reply, follow = rng.choice(DIALOGUES)
    fill = {k: rng.choice(vals) for k, vals in FILL.items()}
    turns = 2 if rng.random() < 0.5 else 3
    messages = [{"role": "user", "content": first.format(**fill)}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": follow[0].format(**fill)})
    if turns == 3:
        messages.append({"role": "assistant", "content": rng.choice(ACKS)})
        messages.append({"role": "user", "content": follow[1].format(**fill)})
    return messages


ACKS = ("Sure, here is a suggestion. Let me know if you want more detail.", "Here you go. Anything else?")
ASKERS = ("a curious student", "a ten-year-old", "a traveller", "an engineer", "a historian", "a home cook", "a nurse")
SELFQ = (
    "Write one interesting question that {who} might ask about {topic}. Reply with the question only.",
    "Think of a good question about {topic} that {who} would want answered. Write only the question.",
)


def selfq(rng: random.Random) -> str:
    domain = rng.choice(sorted(QUESTION_TOPICS))
    return rng.choice(SELFQ).format(who=rng.choice(ASKERS), topic=rng.choice(QUESTION_TOPICS[domain]))


def _unique(category: str, make, count: int, tries: int = 40) -> list[Prompt]:
    seen: dict[str, Prompt] = {}
    for _ in range(count * tries):
        if len(seen) >= count:
            break
        out = make()
        prompt = make_prompt(category, user(out) if isinstance(out, str) else out)
        seen.setdefault(prompt.id, prompt)
    return list(seen.values())


def build_prompts(seed: int = 0, counts: dict[str, int] | None = None) -> list[Prompt]:
    """All prompts, interleaved across categories in proportion to their counts."""
    counts = counts or COUNTS
    signatures = stdlib_signatures()
    rngs = {c: random.Random(f"{seed}-{c}") for c in counts}
    makers = {
        "writing": lambda: writing(rngs["writing"]),
        "questions": lambda: question(rngs["questions"]),
        "translation": lambda: translation(rngs["translation"]),
        "math": lambda: math_problem(rngs["math"]),
        "reasoning": lambda: reasoning_puzzle(rngs["reasoning"]),
        "code": lambda: code_task(rngs["code"], signatures),
        "multiturn": lambda: multiturn(rngs["multiturn"]),
        "selfq": lambda: selfq(rngs["selfq"]),
    }
    per_cat: dict[str, list[Prompt]] = {}
    for category, count in counts.items():
        if category == "docs":
            docs = iter(docs_prompts(rngs["docs"]))
            per_cat[category] = _unique(category, lambda d=docs: next(d, "Summarise: (empty)"), count, tries=1)
        else:
            per_cat[category] = _unique(category, makers[category], count)
    keyed = [((i + 0.5) / len(ps), c, p) for c, ps in per_cat.items() for i, p in enumerate(ps)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [p for _, _, p in keyed]
