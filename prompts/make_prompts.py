"""The shipped prompt set: prompts/train.txt (3000 prompts) and prompts/eval.txt (300, disjoint from train).

  python prompts/make_prompts.py          # rewrites both files; deterministic (seed 19), so the same bytes

A named deviation from the papers' prompts (LAION for ADD's and DMD's training, COCO captions for their
evaluation), which are not shipped here. These were written by us: hand-written lists of subjects (animals,
people, objects, food, vehicles and buildings), settings, actions, scenes, styles and shot/lighting terms,
combined by eleven sentence templates (one subject in a setting, two subjects in a spatial relation, a person
doing something, a scene with no subject, close-ups, ...). Each prompt draws a template and fills it with
random.Random(SEED); prompts are deduplicated (case-insensitively), the first 300 distinct ones are the eval
set and the next 3000 the train set, so the two never share a prompt (they do share vocabulary: eval measures
new combinations, not new words). Lines are at most ~25 words, well inside CLIP's 77 tokens.
"""
import os
import random

SEED, N_TRAIN, N_EVAL = 19, 3000, 300

ANIMALS = [
    "a red fox", "a golden retriever", "a snowy owl", "a tabby cat", "a black cat", "an elephant", "a giraffe",
    "a panda", "a koala", "a lion", "a tiger", "a zebra", "a horse", "a brown bear", "a polar bear", "a penguin",
    "a flamingo", "a hummingbird", "a parrot", "a peacock", "a bald eagle", "a sea turtle", "a dolphin",
    "a humpback whale", "a jellyfish", "an octopus", "a chameleon", "a frog", "a rabbit", "a hedgehog",
    "a squirrel", "a raccoon", "a deer", "a wolf", "a husky", "a corgi", "a dachshund", "a goat", "a sheep",
    "a cow", "a pig", "a hen", "a duck", "a swan", "a butterfly", "a honeybee", "a ladybug", "a snail", "a crab",
    "a goldfish", "a lizard", "a camel", "a kangaroo", "a sloth", "a red panda", "an otter", "a beaver", "a moose",
]
PEOPLE = [
    "an old fisherman", "a young woman in a yellow raincoat", "a little boy", "a little girl", "a chef",
    "an astronaut", "a knight in armour", "a ballet dancer", "a street musician", "a farmer", "a scientist",
    "a firefighter", "a skateboarder", "a surfer", "a painter", "a grandmother", "a businessman in a grey suit",
    "a nurse", "a monk", "a samurai", "a pirate captain", "a wizard", "a cowboy", "a teenager with headphones",
    "a marathon runner", "a rock climber", "a mountain guide", "a baker", "a librarian", "a detective",
    "a gardener", "a cyclist", "a jazz singer", "a potter", "a blacksmith", "a clown", "a queen",
    "a couple holding hands", "a group of friends", "a man with a beard", "a woman with curly hair",
]
OBJECTS = [
    "a vintage typewriter", "a red umbrella", "a wooden chair", "a glass of orange juice", "a teapot",
    "a stack of old books", "a pair of sneakers", "an acoustic guitar", "a grand piano", "a violin",
    "a brass telescope", "a pocket watch", "an hourglass", "a vase of sunflowers", "a potted cactus",
    "a bonsai tree", "a candle", "an oil lamp", "a globe", "a chess board", "a teddy bear", "a paper boat",
    "a kite", "a hot air balloon", "a treasure chest", "a crystal ball", "a leather backpack", "a camera",
    "a desk lamp", "a laptop", "a retro television", "a rotary telephone", "a bicycle helmet", "a surfboard",
    "a snowman", "a sandcastle", "a lantern", "a birdcage", "a music box", "a robot", "a toy train",
]
FOOD = [
    "a bowl of ramen", "a slice of pizza", "a cheeseburger", "a stack of pancakes", "a cup of coffee",
    "a strawberry cake", "a bowl of fruit", "a basket of bread", "sushi on a plate", "a taco", "a croissant",
    "a bowl of salad", "a chocolate donut", "a watermelon", "a pineapple", "a lemon", "a pile of apples",
    "a cup of tea", "an ice cream cone", "a pot of soup",
]
PLACES = [
    "a lighthouse", "a red bicycle", "a steam locomotive", "a sailboat", "a vintage car", "a yellow taxi",
    "a double-decker bus", "a motorcycle", "a fishing boat", "a wooden cabin", "a windmill", "a castle",
    "a treehouse", "a temple", "a greenhouse", "a barn", "a stone bridge", "a phone booth", "a tractor",
    "a submarine", "a rocket", "a hot dog stand", "a cottage with a thatched roof", "a glass skyscraper",
]
SUBJECTS = ANIMALS + PEOPLE + OBJECTS + FOOD + PLACES
SETTINGS = [
    "on a misty mountain ridge", "in a neon-lit alley at night", "on a sandy beach at sunset",
    "in a snowy forest", "in a field of wildflowers", "on a city street in the rain", "in a cozy kitchen",
    "in a library", "on the surface of the moon", "under the sea", "in a desert at noon", "in a bamboo forest",
    "on a wooden table", "in a sunlit living room", "on a rooftop at dusk", "in a busy market", "in a jungle",
    "by a frozen lake", "in a medieval village", "in a futuristic city", "on a farm", "in a garden",
    "in an autumn park", "on a train platform", "in a cave", "on a cliff above the ocean", "in a meadow",
    "in a small cafe", "at a carnival", "in a subway station", "on a snowy street", "in the clouds",
    "in a greenhouse full of plants", "on a pier", "in a wheat field", "in a tropical rainforest",
    "against a plain white background", "on a kitchen counter", "in an art studio", "in outer space",
]
ACTIONS = [
    "reading a book", "playing the guitar", "riding a bicycle", "drinking coffee", "painting a canvas",
    "walking a dog", "holding an umbrella", "dancing", "cooking dinner", "looking at the stars",
    "flying a kite", "taking a photograph", "sleeping in a hammock", "carrying a basket of apples",
    "writing a letter", "laughing", "waving", "fishing", "building a snowman", "playing chess",
]
SCENES = [
    "a misty pine forest at dawn", "a mountain lake reflecting snowy peaks", "a crowded street market in Marrakesh",
    "a quiet harbour at sunrise", "rolling green hills under a cloudy sky", "a waterfall in a lush canyon",
    "a city skyline at night", "a lavender field in Provence", "a desert with tall sand dunes",
    "a coral reef full of fish", "a stormy sea with huge waves", "a cherry blossom avenue in spring",
    "an empty road through a red rock canyon", "a snowy village at Christmas", "the northern lights over a fjord",
    "a rice terrace in the morning fog", "a volcano erupting at night", "an old European town square",
    "a foggy bridge over a river", "a sunflower field under a blue sky", "a tropical island from above",
    "a rainy window with city lights behind it", "a dense jungle with a hidden temple", "a frozen waterfall",
    "a canal in Venice with gondolas", "a lonely tree on a hill", "a night sky full of stars over the desert",
    "a busy train station at rush hour", "an abandoned factory overgrown with plants", "a cozy bookstore interior",
]
STYLES = [
    "a photograph", "a 35mm film photograph", "a studio photograph", "an oil painting", "a watercolor painting",
    "a pencil sketch", "a charcoal drawing", "an ink drawing", "a pastel drawing", "an acrylic painting",
    "a digital illustration", "a concept art painting", "a children's book illustration", "a comic book panel",
    "an anime still", "a pixel art image", "a low-poly 3D render", "an isometric 3D render", "a claymation still",
    "a ukiyo-e woodblock print", "a stained glass window", "a mosaic", "an impressionist painting",
    "a cubist painting", "a pop art poster", "a vintage travel poster", "a linocut print", "a papercut artwork",
    "a black and white photograph", "a polaroid photo", "a tilt-shift photograph", "a cinematic film still",
]
SHOTS = [
    "close-up", "wide-angle shot", "aerial view", "macro photograph", "portrait", "full-body shot",
    "low-angle shot", "top-down view", "side view", "long-exposure photograph",
]
LIGHT = [
    "golden hour lighting", "soft studio lighting", "dramatic rim lighting", "overcast light", "neon lighting",
    "candlelight", "harsh midday sun", "moonlight", "backlit", "volumetric light", "foggy atmosphere",
    "high contrast", "pastel colours", "muted colours", "vibrant colours", "symmetrical composition",
    "shallow depth of field", "highly detailed", "minimalist", "bokeh",
]
RELATIONS = ["next to", "on top of", "to the left of", "to the right of", "in front of", "behind", "beside",
             "facing"]

TEMPLATES = [
    "{style} of {subject} {setting}",
    "{subject} {setting}, {style}",
    "{subject} {setting}, {light}",
    "{shot} of {subject} {setting}, {light}",
    "{style} of {subject}, {light}",
    "{subject} {relation} {subject2}",
    "{subject} {relation} {subject2} {setting}, {style}",
    "{person} {action} {setting}",
    "{style} of {person} {action}, {light}",
    "{scene}, {style}",
    "{scene}, {light}, {shot}",
]


def draw(rng):
    """One prompt: a template filled with independent random choices (unused fields are drawn too, so every
    prompt consumes the same random numbers)."""
    subject = rng.choice(SUBJECTS)
    fill = {"subject": subject, "subject2": rng.choice([s for s in SUBJECTS if s != subject]),
            "setting": rng.choice(SETTINGS),
            "style": rng.choice(STYLES), "shot": rng.choice(SHOTS), "light": rng.choice(LIGHT),
            "relation": rng.choice(RELATIONS), "person": rng.choice(PEOPLE), "action": rng.choice(ACTIONS),
            "scene": rng.choice(SCENES)}
    text = rng.choice(TEMPLATES).format(**fill)
    return text[0].upper() + text[1:]


def make(seed=SEED, n_train=N_TRAIN, n_eval=N_EVAL):
    """-> (train, eval): distinct prompts (case-insensitively), eval the first n_eval drawn, train the next."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n_eval + n_train:
        p = draw(rng)
        if p.lower() not in seen:
            seen.add(p.lower())
            out.append(p)
    return out[n_eval:], out[:n_eval]


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    train, evals = make()
    for name, lines in (("train.txt", train), ("eval.txt", evals)):
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{len(lines)} prompts -> {os.path.join(here, name)}")
