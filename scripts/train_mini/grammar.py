"""Easel Mini's training data: procedural pictures with captions from a small grammar.

Every sample is drawn from a seeded `random.Random`, so a seed gives the same pictures and
captions on every machine. The grammar:

  single   "a [small|big] <colour> <shape> [<position>] [on a <background>]"
  pair     "a <colour> <shape> <relation> a <colour> <shape> [on a <background>]"
  triple   "a <colour> <shape>, a <colour> <shape> and a <colour> <shape>"   (left to right)
  scene    "the sun over the sea", "a house with a tree", "mountains at night", ...

Held-out captions (`heldout_cases`) are combinations that training never draws: the semantic
tests in the Rust suite ask for them, so they measure generalisation, not memory.
"""

import math
import random

from PIL import Image, ImageDraw

SIZE = 128
# Drawn at 4x and box-filtered down: smooth edges, as a rendered picture would have.
SUPERSAMPLE = 4

# Object colours (also what the Rust checker classifies pixels by).
COLOURS = {
    "red": (220, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (245, 220, 35),
    "green": (40, 165, 60),
    "cyan": (40, 205, 225),
    "blue": (35, 70, 215),
    "purple": (135, 55, 185),
    "pink": (245, 135, 190),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ["circle", "square", "triangle", "star", "heart", "ring"]
# name -> (x range, y range) of the object's centre, as fractions of the side.
POSITIONS = {
    "on the left": ((0.16, 0.30), (0.32, 0.68)),
    "on the right": ((0.70, 0.84), (0.32, 0.68)),
    "at the top": ((0.32, 0.68), (0.16, 0.30)),
    "at the bottom": ((0.32, 0.68), (0.70, 0.84)),
    "in the centre": ((0.44, 0.56), (0.44, 0.56)),
    "in the top left corner": ((0.16, 0.28), (0.16, 0.28)),
    "in the top right corner": ((0.72, 0.84), (0.16, 0.28)),
    "in the bottom left corner": ((0.16, 0.28), (0.72, 0.84)),
    "in the bottom right corner": ((0.72, 0.84), (0.72, 0.84)),
}
RELATIONS = ["above", "below", "to the left of", "to the right of"]
# Half-extent of an object as a fraction of the side.
SIZES = {"small": (0.08, 0.10), "": (0.12, 0.15), "big": (0.20, 0.23)}


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def colour_distance(a, b):
    return math.dist(a, b)


def distinct(colour, others, min_distance=110):
    return all(colour_distance(colour, o) >= min_distance for o in others)


# --------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------
def shape_polygon(shape, cx, cy, r):
    """Outline points of a filled shape (circle and ring are drawn as ellipses)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.75), (cx - r, cy + r * 0.75)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "heart":
        points = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + x / 17 * r, cy - (y + 2) / 17 * r))
        return points
    raise ValueError(shape)


def draw_shape(draw, shape, cx, cy, r, colour):
    k = SUPERSAMPLE * SIZE
    cx, cy, r = cx * k, cy * k, r * k
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, int(r * 0.38)))
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=colour)


def fill_background(draw, background, rng):
    """`background` is ("plain", c) / ("gradient", c1, c2) / ("stripes", c1, c2)."""
    k = SUPERSAMPLE * SIZE
    kind = background[0]
    if kind == "plain":
        draw.rectangle([0, 0, k, k], fill=background[1])
    elif kind == "gradient":
        c1, c2 = background[1], background[2]
        for y in range(k):
            t = y / (k - 1)
            draw.line([(0, y), (k, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(c1, c2)))
    elif kind == "stripes":
        c1, c2 = background[1], background[2]
        band = k // rng.choice([6, 8, 10])
        vertical = rng.random() < 0.5
        for i in range(0, k, band):
            colour = c1 if (i // band) % 2 == 0 else c2
            box = [i, 0, i + band, k] if vertical else [0, i, k, i + band]
            draw.rectangle(box, fill=colour)


def render(background, objects, rng, extra=None):
    """objects: [(shape, colour_rgb, cx, cy, r)]; extra: a callable drawing a scene."""
    k = SUPERSAMPLE * SIZE
    image = Image.new("RGB", (k, k))
    draw = ImageDraw.Draw(image)
    if background is not None:
        fill_background(draw, background, rng)
    if extra is not None:
        extra(draw, rng)
    for shape, colour, cx, cy, r in objects:
        draw_shape(draw, shape, cx, cy, r, colour)
    return image.resize((SIZE, SIZE), Image.BOX)


# --------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------
def pick_background(rng, avoid):
    """A background whose colours are far from every object colour in `avoid`."""
    names = [n for n, c in COLOURS.items() if distinct(c, avoid)]
    kind = rng.choices(["plain", "gradient", "stripes"], weights=[6, 2, 1])[0]
    if kind == "plain" or len(names) < 2:
        name = rng.choice(names)
        return ("plain", COLOURS[name]), f"on {article(name)} {name} background"
    a, b = rng.sample(names, 2)
    if kind == "gradient":
        return ("gradient", COLOURS[a], COLOURS[b]), f"on {article(a)} {a} and {b} gradient"
    return ("stripes", COLOURS[a], COLOURS[b]), f"on {a} and {b} stripes"


def place(rng, ranges, r):
    (x0, x1), (y0, y1) = ranges
    cx = min(max(rng.uniform(x0, x1), r + 0.02), 1 - r - 0.02)
    cy = min(max(rng.uniform(y0, y1), r + 0.02), 1 - r - 0.02)
    return cx, cy


def single_key(colour, shape, position):
    return ("single", colour, shape, position)


def pair_key(c1, s1, relation, c2, s2):
    return ("pair", c1, s1, relation, c2, s2)


def sample_single(rng, colour=None, shape=None, position=None, size=None, with_background=None):
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    if position is None:
        position = rng.choice(list(POSITIONS) + [""] * 2)
    if size is None:
        size = rng.choice(["small", "", "", "big"])
    r = rng.uniform(*SIZES[size])
    ranges = POSITIONS.get(position, ((0.25, 0.75), (0.25, 0.75)))
    cx, cy = place(rng, ranges, r)
    background, bg_words = pick_background(rng, [COLOURS[colour]])
    if with_background is None:
        with_background = rng.random() < 0.5
    words = [article(size or colour)] + ([size] if size else []) + [colour, shape] + ([position] if position else [])
    if with_background:
        words.append(bg_words)
    caption = " ".join(words)
    return caption, background, [(shape, COLOURS[colour], cx, cy, r)], single_key(colour, shape, position)


def pair_colours(rng):
    c1 = rng.choice(list(COLOURS))
    c2 = rng.choice([c for c in COLOURS if distinct(COLOURS[c], [COLOURS[c1]])])
    return c1, c2


def sample_pair(rng, c1=None, s1=None, relation=None, c2=None, s2=None, with_background=None):
    if c1 is None:
        c1, c2 = pair_colours(rng)
    s1 = s1 or rng.choice(SHAPES)
    s2 = s2 or rng.choice(SHAPES)
    relation = relation or rng.choice(RELATIONS)
    r1, r2 = rng.uniform(0.09, 0.13), rng.uniform(0.09, 0.13)
    near, far = (0.18, 0.34), (0.66, 0.82)
    across = rng.uniform(0.28, 0.72)
    jitter = rng.uniform(-0.1, 0.1)
    first, second = rng.uniform(*near), rng.uniform(*far)
    if relation == "above":
        p1, p2 = (across, first), (across + jitter, second)
    elif relation == "below":
        p1, p2 = (across, second), (across + jitter, first)
    elif relation == "to the left of":
        p1, p2 = (first, across), (second, across + jitter)
    else:
        p1, p2 = (second, across), (first, across + jitter)
    clamp = lambda v, r: min(max(v, r + 0.02), 1 - r - 0.02)  # noqa: E731
    objects = [
        (s1, COLOURS[c1], clamp(p1[0], r1), clamp(p1[1], r1), r1),
        (s2, COLOURS[c2], clamp(p2[0], r2), clamp(p2[1], r2), r2),
    ]
    background, bg_words = pick_background(rng, [COLOURS[c1], COLOURS[c2]])
    if with_background is None:
        with_background = rng.random() < 0.4
    caption = f"{article(c1)} {c1} {s1} {relation} {article(c2)} {c2} {s2}" + (f" {bg_words}" if with_background else "")
    return caption, background, objects, pair_key(c1, s1, relation, c2, s2)


def sample_triple(rng):
    names = []
    for _ in range(3):
        choices = [c for c in COLOURS if distinct(COLOURS[c], [COLOURS[n] for n in names], 90)]
        names.append(rng.choice(choices))
    shapes = [rng.choice(SHAPES) for _ in range(3)]
    y = rng.uniform(0.35, 0.65)
    objects = []
    for i, (c, s) in enumerate(zip(names, shapes)):
        r = rng.uniform(0.08, 0.11)
        objects.append((s, COLOURS[c], 0.2 + 0.3 * i + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.06, 0.06), r))
    background, bg_words = pick_background(rng, [COLOURS[c] for c in names])
    caption = ", ".join(f"{article(c)} {c} {s}" for c, s in zip(names[:2], shapes[:2]))
    caption += f" and {article(names[2])} {names[2]} {shapes[2]}"
    return caption, background, objects, ("triple",)


def scene_sun_over_sea(rng, sunset):
    sky = ((250, 170, 80), (245, 110, 60)) if sunset else ((120, 190, 245), (200, 230, 250))
    sea = (30, 70, 150) if sunset else (35, 95, 190)
    sun = COLOURS["red"] if sunset and rng.random() < 0.5 else COLOURS["yellow"]
    horizon = rng.uniform(0.55, 0.68)
    sx, sy, sr = rng.uniform(0.25, 0.75), rng.uniform(0.18, horizon - 0.2), rng.uniform(0.08, 0.12)

    def extra(draw, rng):
        k = SUPERSAMPLE * SIZE
        fill_background(draw, ("gradient", sky[0], sky[1]), rng)
        draw.rectangle([0, horizon * k, k, k], fill=sea)
        for _ in range(rng.randint(3, 6)):
            wy = rng.uniform(horizon + 0.05, 0.95) * k
            wx = rng.uniform(0.05, 0.8) * k
            draw.line([(wx, wy), (wx + 0.15 * k, wy)], fill=(200, 225, 250), width=SUPERSAMPLE)

    caption = "the sun over the sea at sunset" if sunset else "the sun over the sea"
    return caption, None, [("circle", sun, sx, sy, sr)], extra


def scene_house_with_tree(rng, night):
    k = SUPERSAMPLE * SIZE
    ground = rng.uniform(0.68, 0.78)
    house_left = rng.random() < 0.5
    hx = rng.uniform(0.25, 0.38) if house_left else rng.uniform(0.62, 0.75)
    tx = rng.uniform(0.68, 0.8) if house_left else rng.uniform(0.2, 0.32)
    hs = rng.uniform(0.13, 0.17)
    wall = rng.choice([COLOURS["red"], COLOURS["white"], COLOURS["yellow"], (200, 150, 100)])

    def extra(draw, rng):
        sky = ((15, 20, 60), (40, 50, 100)) if night else ((120, 190, 245), (200, 230, 250))
        fill_background(draw, ("gradient", sky[0], sky[1]), rng)
        draw.rectangle([0, ground * k, k, k], fill=(40, 120, 45) if not night else (20, 60, 25))
        base = ground * k
        draw.rectangle([(hx - hs) * k, base - 2 * hs * k, (hx + hs) * k, base], fill=wall)
        draw.polygon([((hx - hs * 1.25) * k, base - 2 * hs * k), ((hx + hs * 1.25) * k, base - 2 * hs * k),
                      (hx * k, base - 3.3 * hs * k)], fill=COLOURS["brown"])
        draw.rectangle([(hx - 0.25 * hs) * k, base - 0.9 * hs * k, (hx + 0.25 * hs) * k, base], fill=(70, 40, 20))
        draw.rectangle([(tx - 0.025) * k, (ground - 0.16) * k, (tx + 0.025) * k, base], fill=COLOURS["brown"])
        tr = rng.uniform(0.09, 0.12)
        draw.ellipse([(tx - tr) * k, (ground - 0.16 - 1.6 * tr) * k, (tx + tr) * k, (ground - 0.16 + 0.4 * tr) * k],
                     fill=COLOURS["green"])
        if night:
            mx, my, mr = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.2), 0.05
            draw.ellipse([(mx - mr) * k, (my - mr) * k, (mx + mr) * k, (my + mr) * k], fill=(240, 240, 210))

    caption = "a house with a tree at night" if night else "a house with a tree"
    return caption, None, [], extra


def scene_mountains(rng, night):
    k = SUPERSAMPLE * SIZE

    def extra(draw, rng):
        sky = ((10, 12, 40), (35, 40, 90)) if night else ((110, 180, 240), (200, 225, 250))
        fill_background(draw, ("gradient", sky[0], sky[1]), rng)
        if night:
            for _ in range(rng.randint(8, 16)):
                sx, sy = rng.uniform(0, 1) * k, rng.uniform(0, 0.45) * k
                draw.ellipse([sx - 2, sy - 2, sx + 2, sy + 2], fill=(240, 240, 220))
            mx, my, mr = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.25), rng.uniform(0.05, 0.07)
            draw.ellipse([(mx - mr) * k, (my - mr) * k, (mx + mr) * k, (my + mr) * k], fill=(240, 240, 210))
        else:
            sx, sy, sr = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.22), 0.07
            draw.ellipse([(sx - sr) * k, (sy - sr) * k, (sx + sr) * k, (sy + sr) * k], fill=COLOURS["yellow"])
        rock = (70, 70, 95) if night else (110, 100, 95)
        snow = (200, 200, 215) if night else (250, 250, 250)
        for _ in range(rng.randint(2, 4)):
            px, ph, pw = rng.uniform(0.1, 0.9), rng.uniform(0.35, 0.6), rng.uniform(0.25, 0.4)
            top = (1 - ph) * k
            draw.polygon([((px - pw) * k, k), ((px + pw) * k, k), (px * k, top)], fill=rock)
            cap = 0.22
            draw.polygon([((px - pw * cap) * k, top + ph * cap * k), ((px + pw * cap) * k, top + ph * cap * k),
                          (px * k, top)], fill=snow)

    caption = "mountains at night" if night else "mountains in the day"
    return caption, None, [], extra


def sample_scene(rng):
    kind = rng.randrange(6)
    if kind < 2:
        return scene_sun_over_sea(rng, sunset=kind == 1)
    if kind < 4:
        return scene_house_with_tree(rng, night=kind == 3)
    return scene_mountains(rng, night=kind == 5)


# --------------------------------------------------------------------------
# held-out combinations (never drawn in training)
# --------------------------------------------------------------------------
def heldout_cases():
    """Captions for the semantic tests, with what the checker must find."""
    rng = random.Random(20261203)
    cases, keys = [], set()
    positions = list(POSITIONS)
    while len([c for c in cases if c["kind"] == "single"]) < 40:
        colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(positions)
        key = single_key(colour, shape, position)
        if key in keys:
            continue
        keys.add(key)
        cases.append({"kind": "single", "caption": f"{article(colour)} {colour} {shape} {position}", "colour": colour,
                      "shape": shape, "position": position})
    while len([c for c in cases if c["kind"] == "pair"]) < 30:
        c1, c2 = pair_colours(rng)
        s1, s2, relation = rng.choice(SHAPES), rng.choice(SHAPES), rng.choice(RELATIONS)
        key = pair_key(c1, s1, relation, c2, s2)
        if key in keys:
            continue
        keys.add(key)
        cases.append({"kind": "pair", "caption": f"{article(c1)} {c1} {s1} {relation} {article(c2)} {c2} {s2}", "colour": c1,
                      "shape": s1, "relation": relation, "colour_2": c2, "shape_2": s2})
    return cases, keys


HELDOUT_CASES, HELDOUT_KEYS = heldout_cases()


def sample(rng):
    """One training sample: (caption, PIL image). Held-out combinations are redrawn."""
    while True:
        kind = rng.choices(["single", "pair", "triple", "scene"], weights=[46, 36, 8, 10])[0]
        if kind == "scene":
            caption, background, objects, extra = sample_scene(rng)
            return caption, render(background, objects, rng, extra)
        if kind == "single":
            caption, background, objects, key = sample_single(rng)
        elif kind == "pair":
            caption, background, objects, key = sample_pair(rng)
        else:
            caption, background, objects, key = sample_triple(rng)
        if key in HELDOUT_KEYS:
            continue
        return caption, render(background, objects, rng)


if __name__ == "__main__":
    import argparse
    import os

    parser = argparse.ArgumentParser(description="draw a contact sheet of training samples")
    parser.add_argument("--out", default="out/mini-samples")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    sheet = Image.new("RGB", (SIZE * 6, SIZE * ((args.count + 5) // 6)))
    with open(os.path.join(args.out, "captions.txt"), "w") as f:
        for i in range(args.count):
            caption, image = sample(rng)
            sheet.paste(image, ((i % 6) * SIZE, (i // 6) * SIZE))
            f.write(f"{i}: {caption}\n")
    sheet.save(os.path.join(args.out, "sheet.png"))
    print(f"{len(HELDOUT_CASES)} held-out cases; sheet in {args.out}")


def draw_heldout(path, seed=7):
    """The held-out captions drawn as the training data would draw them, side by side in one
    PNG: the semantic test's checker must recognise these before it judges the model."""
    rng = random.Random(seed)
    sheet = Image.new("RGB", (SIZE * len(HELDOUT_CASES), SIZE))
    for i, case in enumerate(HELDOUT_CASES):
        if case["kind"] == "single":
            _, background, objects, _ = sample_single(rng, case["colour"], case["shape"], case["position"], "", False)
        else:
            _, background, objects, _ = sample_pair(
                rng, case["colour"], case["shape"], case["relation"], case["colour_2"], case["shape_2"], False
            )
        sheet.paste(render(background, objects, rng), (i * SIZE, 0))
    sheet.save(path)
