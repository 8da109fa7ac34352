"""Presets for the datasets our users mix most. A config names one (`preset: squad`) and gets its hub name,
subset, splits and format; `build` turns a row in that dataset's own columns into the format's fields.
Anything set explicitly in the config (hub, split, data_files, ...) wins over the preset.
Users add a preset by adding an entry to PRESETS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Preset:
    hub: str
    """The dataset's name on the Hugging Face hub."""
    format: str
    """The loratune format its rows become: text or completion."""
    build: Callable[[dict], dict]
    """Row in the dataset's columns -> the format's fields (`text`, or `prompt` + `response`)."""
    subset: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = None


AG_NEWS_TOPICS = ["World", "Sports", "Business", "Sci/Tech"]


def _classify(instruction: str, names: list[str], text_column: str = "text") -> Callable[[dict], dict]:
    def build(row: dict) -> dict:
        return {"prompt": f"{instruction} ({', '.join(names)}):\n{row[text_column]}\nAnswer:",
                "response": f" {names[row['label']]}"}
    return build


PRESETS: dict[str, Preset] = {
    "wikitext-103": Preset("Salesforce/wikitext", "text", lambda r: {"text": r["text"]},
                           subset="wikitext-103-raw-v1", eval_split="validation"),
    "tinystories": Preset("roneneldan/TinyStories", "text", lambda r: {"text": r["text"]}, eval_split="validation"),
    "ag_news": Preset("fancyzhx/ag_news", "completion", _classify("Classify the topic of this article", AG_NEWS_TOPICS),
                      eval_split="test"),
    "yelp_review_full": Preset("Yelp/yelp_review_full", "completion",
                               _classify("Rate this review", ["1 star", "2 stars", "3 stars", "4 stars", "5 stars"]),
                               eval_split="test"),
    "imdb": Preset("stanfordnlp/imdb", "completion", _classify("Is this review positive or negative", ["negative", "positive"]),
                   eval_split="test"),
    "cnn_dailymail": Preset("abisee/cnn_dailymail", "completion",
                            lambda r: {"prompt": f"Summarize this article:\n{r['article']}\nSummary:", "response": f" {r['highlights']}"},
                            subset="3.0.0", eval_split="validation"),
    "xsum": Preset("EdinburghNLP/xsum", "completion",
                   lambda r: {"prompt": f"Summarize in one sentence:\n{r['document']}\nSummary:", "response": f" {r['summary']}"},
                   eval_split="validation"),
    "squad": Preset("rajpurkar/squad", "completion",
                    lambda r: {"prompt": f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:",
                               "response": f" {r['answers']['text'][0]}"}, eval_split="validation"),
    "common_gen": Preset("allenai/common_gen", "completion",
                         lambda r: {"prompt": f"Write a sentence using these words: {', '.join(r['concepts'])}\nSentence:",
                                    "response": f" {r['target']}"}, eval_split="validation"),
    "bool_q": Preset("google/boolq", "completion",
                     lambda r: {"prompt": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer (yes or no):",
                                "response": " yes" if r["answer"] else " no"}, eval_split="validation"),
    # Data-to-text: a structured record (slot[value], ...) becomes a sentence.
    "e2e_nlg": Preset("tuetschek/e2e_nlg", "completion",
                      lambda r: {"prompt": f"Describe this restaurant record in one sentence: {r['meaning_representation']}\nSentence:",
                                 "response": f" {r['human_reference']}"}, eval_split="validation"),
}
