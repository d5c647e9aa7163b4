"""What the synthetic people say: a bundled public-domain sentence list plus a small grammar.

HARVARD are the first six lists of the Harvard sentences (IEEE Recommended Practice for Speech Quality
Measurements, 1969), phonetically balanced and in the public domain. The grammar adds unbounded variety
with the same everyday vocabulary. Both are deterministic given the numpy Generator.
"""

from __future__ import annotations

import numpy as np

HARVARD: tuple[str, ...] = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
    "A king ruled the state in the early days.",
    "The ship was torn apart on the sharp reef.",
    "Sickness kept him home the third week.",
    "The wide road shimmered in the hot sun.",
    "The lazy cow lay in the cool grass.",
    "Lift the square stone over the fence.",
    "The rope will bind the seven books at once.",
    "Hop over the fence and plunge in.",
    "The friendly gang left the drug store.",
    "Mesh wire keeps chicks inside.",
    "The frosty air passed through the coat.",
    "The crooked maze failed to fool the mouse.",
    "Adding fast leaves the sum unclear.",
    "The show was a flop from the very start.",
    "A saw is a tool used for making boards.",
    "The wagon moved on well oiled wheels.",
    "March the soldiers past the next hill.",
    "A cup of sugar makes sweet fudge.",
    "Place a rosebush near the porch steps.",
    "Both lost their lives in the raging storm.",
)

_SUBJECTS = ("my brother", "the old farmer", "a tall woman", "our neighbour", "the baker", "my friend Paul",
             "the quiet boy", "a famous painter", "the mayor", "Aunt Mabel", "the pilot", "we")
_VERBS = ("bought", "painted", "found", "moved", "fixed", "opened", "carried", "washed", "sold", "borrowed",
          "watched", "hid")
_ADJECTIVES = ("blue", "heavy", "wooden", "bright", "broken", "smooth", "purple", "tiny", "warm", "old",
               "shiny", "round")
_NOUNS = ("boat", "piano", "window", "basket", "umbrella", "map", "kettle", "bicycle", "mirror", "violin",
          "lamp", "book")
_PLACES = ("by the river", "on Monday morning", "near the market", "in the garden", "before lunch",
           "at the old mill", "after the storm", "behind the house", "under the bridge", "every summer")
_OPENERS = ("Well,", "You know,", "Honestly,", "Yesterday", "Oh,", "So")


def grammar_sentence(rng: np.random.Generator) -> str:
    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    subject = pick(_SUBJECTS)
    text = f"{subject} {pick(_VERBS)} the {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_PLACES)}"
    if rng.random() < 0.3:
        text = f"{pick(_OPENERS)} {text}"
    text = text[0].upper() + text[1:]
    return text + ("?" if rng.random() < 0.15 else ".")


def sentence(rng: np.random.Generator) -> str:
    """Half from the Harvard list, half from the grammar."""
    if rng.random() < 0.5:
        return HARVARD[int(rng.integers(len(HARVARD)))]
    return grammar_sentence(rng)
