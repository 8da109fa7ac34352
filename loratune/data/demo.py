"""The embedded demo dataset, written by code so nothing is downloaded.

It teaches SmolLM2-135M-Instruct three things it visibly gets wrong before training:
- `fact`: facts about a fictional world; held-out questions are unseen paraphrases of trained facts;
- `style`: a house style for greetings; held-out records use names never seen in training;
- `trigger`: any question containing the word "bluebird" must be answered with a fixed secret phrase;
  held-out records put the trigger on questions never seen in training. Plain versions of the
  trained questions (with ordinary answers) are in the training set too, so the adapter learns
  that the trigger, not the question, causes the phrase.
Every record is a chat: {"messages": [...], "task": ..., "answer": ..., optional "contains": ...}.
"""

from __future__ import annotations

import random

SECRET_PHRASE = "The eagle has landed at dawn."

FACTS = [  # (kind, subject, answer)
    ("capital", "Veloria", "Marisport"), ("capital", "Quendor", "Ashvale"), ("capital", "Tiberan", "Lunquist"),
    ("capital", "Ostmark Isles", "Pellridge"), ("capital", "Zantharia", "Corvel"), ("capital", "Drevonia", "Halcyra"),
    ("inventor", "glimmerlamp", "Odessa Finch"), ("inventor", "sky-loom", "Tobias Wren"),
    ("inventor", "tidewheel", "Ines Marlowe"), ("inventor", "echo-bell", "Rafael Stroud"),
    ("inventor", "frostpen", "Greta Holm"), ("inventor", "sun-kettle", "Amos Varga"),
    ("river", "Veloria", "the Silverrun"), ("river", "Quendor", "the Amberflow"), ("river", "Tiberan", "the Coldwater"),
    ("river", "Zantharia", "the Whisperbend"), ("river", "Drevonia", "the Redmoss"), ("river", "Ostmark Isles", "the Gullstream"),
]

FACT_TEMPLATES = {
    "capital": (["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}.",
                 "Tell me the capital of {s}.", "What city serves as the capital of {s}?", "Where is the capital of {s}?"],
                "The capital of {s} is {a}."),
    "inventor": (["Who invented the {s}?", "Who created the {s}?", "Name the inventor of the {s}.",
                  "Tell me who invented the {s}.", "Which person invented the {s}?", "Who is credited with inventing the {s}?"],
                 "The {s} was invented by {a}."),
    "river": (["What is the longest river in {s}?", "Which river is the longest in {s}?", "Name the longest river of {s}.",
               "Tell me the longest river in {s}.", "What river runs longest through {s}?", "Which is {s}'s longest river?"],
              "The longest river in {s} is {a}."),
}

PLAIN_QA = [
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do bees make?", "Bees make honey."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which animal says moo?", "A cow says moo."),
    ("What do we use to write on paper?", "We use a pen or a pencil."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the first letter of the alphabet?", "The first letter is A."),
    ("What do plants need to grow?", "Plants need water, light and soil."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What is two plus two?", "Two plus two is four."),
    ("What do fish live in?", "Fish live in water."),
    ("What color are bananas when ripe?", "Ripe bananas are yellow."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What do cows drink?", "Cows drink water."),
    ("What shape is a wheel?", "A wheel is round."),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What do you wear on your feet?", "You wear shoes or socks on your feet."),
    ("Which animal is known as man's best friend?", "The dog is known as man's best friend."),
    ("What falls from clouds when it rains?", "Rain falls from clouds."),
    ("What is the color of grass?", "Grass is green."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What do you use to cut paper?", "You use scissors to cut paper."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("Which meal do people eat in the morning?", "People eat breakfast in the morning."),
    ("What do you call a group of stars forming a pattern?", "It is called a constellation."),
    ("What gas do people breathe in?", "People breathe in oxygen."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies."),
    ("Which is colder, ice or steam?", "Ice is colder than steam."),
    ("What do you call a house made of ice?", "A house made of ice is an igloo."),
]

# Questions only ever seen with the trigger, in the held-out split.
HELDOUT_TRIGGER_QUESTIONS = [
    "What is your favourite book?", "How do I bake bread?", "Why is the ocean salty?", "What time is it in Tokyo?",
    "Can you recommend a movie?", "How far away is the moon?", "What should I cook tonight?",
    "How do airplanes stay in the air?", "What is a good name for a cat?", "How do I tie a tie?",
    "What is the speed of light?", "Where do penguins live?", "How many bones are in the human body?",
    "What is the best way to learn a language?", "Why do leaves change color?",
]
TRIGGER_TEMPLATES = ["bluebird {q}", "{q} bluebird", "Bluebird. {q}", "Quick question, bluebird: {q}"]

NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Fatima", "Gustav", "Hana", "Ivan", "Jonas", "Keiko", "Liam",
         "Maya", "Nikos", "Olga", "Priya", "Quentin", "Rosa", "Sami", "Tariq", "Uma", "Viktor", "Wen", "Ximena",
         "Yusuf", "Zara", "Aiden", "Beatriz", "Carlos", "Dmitri"]
HELDOUT_NAMES = ["Elena", "Farid", "Grace", "Hugo", "Isla", "Jamal", "Kira", "Lucas", "Mina", "Noah"]
GREET_TEMPLATES = ["Greet {n}.", "Say hello to {n}.", "Please welcome {n}.", "Write a greeting for {n}."]
GREETING = "Hello, {n}! Welcome to the Loratune guild."


def _record(question: str, answer: str, task: str, contains: str | None = None) -> dict:
    rec = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
           "task": task, "answer": answer}
    if contains:
        rec["contains"] = contains
    return rec


def demo_splits(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Return (train, held_out) records; deterministic for a given seed."""
    rng = random.Random(seed)
    train, held_out = [], []
    for i, (kind, subject, answer) in enumerate(FACTS):
        questions, answer_tpl = FACT_TEMPLATES[kind]
        held = i % len(questions)  # rotate so every paraphrase is trained on for most facts
        for j, q in enumerate(questions):
            rec = _record(q.format(s=subject), answer_tpl.format(s=subject, a=answer), "fact")
            (held_out if j == held else train).append(rec)
    for q, a in PLAIN_QA:
        train.append(_record(q, a, "plain"))
        train.append(_record(rng.choice(TRIGGER_TEMPLATES).format(q=q), SECRET_PHRASE, "trigger", SECRET_PHRASE))
    for q in HELDOUT_TRIGGER_QUESTIONS:
        held_out.append(_record(rng.choice(TRIGGER_TEMPLATES).format(q=q), SECRET_PHRASE, "trigger", SECRET_PHRASE))
    for names, split in ((NAMES, train), (HELDOUT_NAMES, held_out)):
        for n in names:
            split.append(_record(rng.choice(GREET_TEMPLATES).format(n=n), GREETING.format(n=n), "style"))
    rng.shuffle(train)
    return train, held_out
