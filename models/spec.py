"""Facts of the reference AnomalyGPT model that every part of the toolkit relies on.

Defined once here (training side); the exporter copies what the device needs into the
bundle's manifest, so the runtime never imports this module.
"""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
PATCH_GRID = 16  # 224 / 14
N_TAPS = 4
N_PROMPTS = 18  # 9 learned base prompts + 9 derived from the 3x3 conv output
N_BASE_PROMPTS = 9
# the zero-shot decoder's logits: this times the cosine of patch and text features (spec section 3.3)
LOGIT_SCALE = 100.0

# Conversation format (spec section 6). Each text segment is tokenised on its own,
# without special tokens; BOS is added by hand.
PROMPT_START = "### Human: <Img>"
IMAGE_END = "</Img> "
ASSISTANT = "\n### Assistant:"
TURN_SEPARATOR = "###"
# Generation stops as soon as "##" (Vicuna token 2277) has been produced; the answer is
# what came before it, with the trailing newline removed.
STOP_STRING = "##"
QUESTION = "Is there any anomaly in the image?"

# Zero-shot text features: prompt ensemble (spec section 3.2), verbatim.
PROMPT_NORMAL = ['{}', 'flawless {}', 'perfect {}', 'unblemished {}', '{} without flaw',
                 '{} without defect', '{} without damage']
PROMPT_ABNORMAL = ['damaged {}', 'broken {}', '{} with flaw', '{} with defect', '{} with damage']
PROMPT_TEMPLATES = ['a photo of a {}.', 'a photo of the {}.']

# Inference class list; order matters (first substring match wins), default "object".
CLASS_NAMES = ['bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal nut',
               'pill', 'screw', 'tile', 'toothbrush', 'transistor', 'wood', 'zipper', 'object',
               'candle', 'cashew', 'chewinggum', 'fryum', 'macaroni', 'pcb', 'pipe fryum']
DEFAULT_CLASS = 'object'

_PLAIN = "without any damage, flaw, defect, scratch, hole or broken part."
DESCRIPTIONS = {
    'bottle': "This is a photo of a bottle for anomaly detection, which should be round, " + _PLAIN,
    'cable': "This is a photo of three cables for anomaly detection, they are green, blue and grey, "
             "which cannot be missed or swapped and should be " + _PLAIN,
    'capsule': "This is a photo of a capsule for anomaly detection, which should be black and orange, "
               "with print '500', " + _PLAIN,
    'carpet': "This is a photo of carpet for anomaly detection, which should be " + _PLAIN,
    'grid': "This is a photo of grid for anomaly detection, which should be " + _PLAIN,
    'hazelnut': "This is a photo of a hazelnut for anomaly detection, which should be " + _PLAIN,
    'leather': "This is a photo of leather for anomaly detection, which should be brown and " + _PLAIN,
    'metal nut': "This is a photo of a metal nut for anomaly detection, which should be without any "
                 "damage, flaw, defect, scratch, hole or broken part, and shouldn't be fliped.",
    'pill': "This is a photo of a pill for anomaly detection, which should be white, with print 'FF' "
            "and red patterns, " + _PLAIN,
    'screw': "This is a photo of a screw for anomaly detection, which tail should be sharp, and " + _PLAIN,
    'tile': "This is a photo of tile for anomaly detection, which should be " + _PLAIN,
    'toothbrush': "This is a photo of a toothbrush for anomaly detection, which should be " + _PLAIN,
    'transistor': "This is a photo of a transistor for anomaly detection, which should be " + _PLAIN,
    'wood': "This is a photo of wood for anomaly detection, which should be brown with patterns, " + _PLAIN,
    'zipper': "This is a photo of a zipper for anomaly detection, which should be " + _PLAIN,
    'candle': "This is a photo of 4 candles for anomaly detection, every candle should be round, " + _PLAIN,
    'capsules': "This is a photo of many small capsules for anomaly detection, every capsule is green, "
                "should be " + _PLAIN,
    'cashew': "This is a photo of a cashew for anomaly detection, which should be " + _PLAIN,
    'chewinggum': "This is a photo of a chewinggom for anomaly detection, which should be white, " + _PLAIN,
    'fryum': "This is a photo of a fryum for anomaly detection on green background, which should be " + _PLAIN,
    'macaroni1': "This is a photo of 4 macaronis for anomaly detection, which should be " + _PLAIN,
    'macaroni2': "This is a photo of 4 macaronis for anomaly detection, which should be " + _PLAIN,
    'pcb1': "This is a photo of pcb for anomaly detection, which should be " + _PLAIN,
    'pcb2': "This is a photo of pcb for anomaly detection, which should be " + _PLAIN,
    'pcb3': "This is a photo of pcb for anomaly detection, which should be " + _PLAIN,
    'pcb4': "This is a photo of pcb for anomaly detection, which should be " + _PLAIN,
    'pipe fryum': "This is a photo of a pipe fryum for anomaly detection, which should be " + _PLAIN,
}

# 3x3 location words (spec section 7.2): rows top/middle/bottom, columns left/centre/right;
# a coordinate at exactly 1/3 or 2/3 belongs to the lower cell.
POSITION_WORDS = (('top left', 'top', 'top right'),
                  ('left', 'center', 'right'),
                  ('bottom left', 'bottom', 'bottom right'))

ANSWER_NORMAL = "No, there is no anomaly in the image."
ANSWER_ONE = "Yes, there is an anomaly in the image, at the {} of the image."
ANSWER_TWO = "Yes, there are 2 anomalies in the image, they are at the {} and {} of the image."
ANSWER_TWO_SAME = "Yes, there are 2 anomalies in the image, they are at the {} of the image."


def resolve_class(text: str) -> str:
    """The reference's class choice: first CLASS_NAMES entry that is a substring of the prompt."""
    for name in CLASS_NAMES:
        if name in text:
            return name
    return DEFAULT_CLASS


def position_word(row: float, col: float) -> str:
    """Position word for a centre given as fractions of height (row) and width (col)."""
    from ..runtime.answers import position_word as word_in_grid  # the one implementation of the grid rule
    return word_in_grid(row, col, POSITION_WORDS)


def question_for(class_name: str) -> str:
    """The benchmark question: the class description, a space, then QUESTION."""
    desc = DESCRIPTIONS.get(class_name.replace('_', ' '), DESCRIPTIONS.get(class_name))
    return f"{desc} {QUESTION}" if desc else QUESTION


# Procedural demo categories (models/synthetic.py): the real MVTec images never reach these machines,
# so the small demo model is trained on these, described in the style of the MVTec `describles`.
SYNTHETIC_DESCRIPTIONS = {
    'woven_fabric': "This is a photo of woven fabric for anomaly detection, which should be beige with a "
                    "regular weave, " + _PLAIN,
    'brushed_metal': "This is a photo of brushed metal for anomaly detection, which should be grey with fine "
                     "parallel lines, " + _PLAIN,
    'wood_grain': "This is a photo of wood grain for anomaly detection, which should be brown with patterns, "
                  + _PLAIN,
    'ceramic_tiles': "This is a photo of ceramic tiles for anomaly detection, which should be white with straight "
                     "grout lines, " + _PLAIN,
    'washer': "This is a photo of a metal washer for anomaly detection, which should be round, " + _PLAIN,
}
