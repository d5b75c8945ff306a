"""A deterministic synthetic visual-question dataset: shapes, colours, positions and printed text.

It trains and evaluates tiny PIIP-LLaVA models on CPU, and its small-font questions show what the
high-resolution branch adds: their text is under 3 pixels tall once the image is shrunk to 64 px.

    from piip_llava.synthetic import export_dataset, tokenizer_corpus
    stats = export_dataset("data/synthetic", seed=0, num_train_images=400, num_eval_images=120)
    texts = tokenizer_corpus("data/synthetic")

`item_rng` gives the random stream of one item (split, index, purpose), so code that draws scenes of
its own (the demo recipe's stage 0) never repeats the exported ones.
"""

from .export import export_dataset, item_rng, tokenizer_corpus, write_examples
from .questions import QUESTION_TYPES, MultipleChoice, Question, all_questions, caption, chance_accuracy
from .scenes import Scene, SceneText, Shape, generate_scene, render_scene

__all__ = [
    "QUESTION_TYPES",
    "MultipleChoice",
    "Question",
    "Scene",
    "SceneText",
    "Shape",
    "all_questions",
    "caption",
    "chance_accuracy",
    "export_dataset",
    "generate_scene",
    "item_rng",
    "render_scene",
    "tokenizer_corpus",
    "write_examples",
]
