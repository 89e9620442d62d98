"""Deterministic, offline generator of short TinyStories-style children's stories.

Each story follows the same arc (a character, a place, a treasured object, a small problem,
a resolution and a moral) and is assembled from templates with many interchangeable parts.
The combinations give enough variety for a tiny model to learn the language of the stories,
while a small sample is still easy to memorise, which is what the demo's overfitting run needs.
"""

from __future__ import annotations

import random

NAMES = [
    "Lily",
    "Tom",
    "Mia",
    "Ben",
    "Sue",
    "Max",
    "Anna",
    "Sam",
    "Lucy",
    "Jack",
    "Zoe",
    "Leo",
    "Emma",
    "Tim",
    "Ella",
    "Finn",
    "Rosa",
    "Ned",
    "Ivy",
    "Kai",
    "Nora",
    "Ollie",
    "Ruby",
    "Jake",
]
ANIMALS = [
    "cat",
    "dog",
    "bunny",
    "bear",
    "duck",
    "fox",
    "frog",
    "mouse",
    "bird",
    "pig",
    "lamb",
    "owl",
    "turtle",
    "puppy",
    "kitten",
    "squirrel",
]
KIDS = ["girl", "boy"]
TRAITS = [
    "little",
    "happy",
    "shy",
    "brave",
    "curious",
    "kind",
    "silly",
    "tiny",
    "clever",
    "sleepy",
    "friendly",
    "busy",
]
PLACES = [
    "the park",
    "the garden",
    "the forest",
    "the beach",
    "a small house",
    "the farm",
    "the school",
    "the lake",
    "a big hill",
    "the town",
    "the meadow",
    "the zoo",
]
OBJECTS = [
    "red ball",
    "blue kite",
    "shiny stone",
    "toy car",
    "yellow hat",
    "little boat",
    "soft teddy",
    "green leaf",
    "big drum",
    "picture book",
    "pink balloon",
    "wooden box",
    "funny sock",
    "gold key",
    "paper star",
    "warm blanket",
]
FEELINGS_BAD = ["sad", "scared", "worried", "upset", "lonely", "angry", "confused"]
FEELINGS_GOOD = ["happy", "proud", "glad", "calm", "excited", "thankful"]
FRIENDS = [
    "a wise owl",
    "a kind old man",
    "a little bird",
    "a big dog",
    "a gentle cow",
    "{name}'s mom",
    "{name}'s dad",
    "a new friend",
    "a funny frog",
    "a tall giraffe",
    "a small ant",
    "the teacher",
]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "bright"]
TIMES = ["One day", "Once upon a time", "One morning", "Long ago", "One sunny day", "Last summer"]

# Each problem pairs a setback with the way it is undone, so stories stay coherent.
PROBLEMS = [
    (
        "the {obj} fell into the water",
        "{friend} found a long stick and pulled the {obj} out",
    ),
    (
        "the wind took the {obj} up into a tree",
        "{friend} climbed the tree and brought the {obj} down",
    ),
    (
        "{name} lost the {obj} in the tall grass",
        "{friend} helped {name} look, and they found the {obj} under a rock",
    ),
    (
        "the {obj} broke into two pieces",
        "{friend} brought some glue and fixed the {obj}",
    ),
    (
        "a naughty monkey took the {obj} and ran away",
        "{friend} asked the monkey nicely, and the monkey gave the {obj} back",
    ),
    (
        "the {obj} got all wet and dirty in the mud",
        "{friend} helped {name} wash the {obj} until it was clean",
    ),
    (
        "{name} could not reach the {obj} on the high shelf",
        "{friend} held {name} up high so {name} could reach the {obj}",
    ),
    (
        "another child wanted the {obj} too, and they began to fight",
        "{friend} showed them how to take turns with the {obj}",
    ),
]
MORALS = [
    "It is good to ask for help when you need it.",
    "Sharing makes everyone happy.",
    "Being kind to others is always the right thing to do.",
    "Friends help each other.",
    "It is better to be patient than to be angry.",
    "Saying sorry and please can fix many things.",
    "Never give up, even when things are hard.",
    "Taking care of your things is important.",
]
OPENINGS = [
    "{time}, there was a {trait} {kind} named {name}.",
    "{time}, a {trait} {kind} called {name} lived near {place}.",
    "{time}, {name} the {trait} {kind} went to {place}.",
]
LIKES = [
    "{name} had a {obj}. {name} loved the {obj} very much.",
    "{name} liked to play with a {obj} every day.",
    "{name}'s favorite thing was a {obj}.",
    "{name} always took the {obj} everywhere.",
]
SCENES = [
    "It was a {weather} day, and {name} went to play at {place}.",
    "The day was {weather}, so {name} ran to {place} with the {obj}.",
    "{name} wanted to show the {obj} to everyone at {place}.",
]
TROUBLES = [
    "But then {problem}. {name} felt very {bad}.",
    "Suddenly, {problem}! {name} was {bad} and began to cry.",
    "Oh no, {problem}. {name} did not know what to do and felt {bad}.",
]
HELPS = [
    "Then {solution}.",
    "Just then, {solution}.",
    "Soon {solution}.",
]
ENDINGS = [
    '{name} smiled and said, "Thank you!" {name} felt {good} again.',
    "{name} hugged the {obj} and felt {good}. They played together until the sun went down.",
    '"You are a good friend," said {name}. From that day on, {name} was {good} and never sad.',
    "{name} was so {good}. That night, {name} slept with the {obj} close by.",
]


def _story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    kind = rng.choice(ANIMALS + KIDS)
    obj = rng.choice(OBJECTS)
    friend = rng.choice(FRIENDS)
    problem, solution = rng.choice(PROBLEMS)
    slots = {
        "name": name,
        "kind": kind,
        "obj": obj,
        "friend": friend,
        "trait": rng.choice(TRAITS),
        "place": rng.choice(PLACES),
        "weather": rng.choice(WEATHER),
        "time": rng.choice(TIMES),
        "bad": rng.choice(FEELINGS_BAD),
        "good": rng.choice(FEELINGS_GOOD),
    }
    slots["friend"] = friend.format(name=name)
    slots["problem"] = problem.format(**slots)
    slots["solution"] = solution.format(**slots)
    parts = [
        rng.choice(OPENINGS),
        rng.choice(LIKES),
        rng.choice(SCENES),
        rng.choice(TROUBLES),
        rng.choice(HELPS),
        rng.choice(ENDINGS),
    ]
    text = " ".join(part.format(**slots) for part in parts)
    return f"{text} {rng.choice(MORALS)}"


def generate_stories(n: int, seed: int) -> list[str]:
    """Return ``n`` stories; the same ``(n, seed)`` always gives the same list."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]
