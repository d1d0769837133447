"""User rewards for recipes/rl/grpo.yaml (named there as `rewards.py:capitals`).

peftcli calls a reward as TRL does: prompts=, completions= and one list per other data column
(here `answer`); it returns one number per completion.
"""


def capitals(prompts, completions, answer, **columns):
    """The share of the answer's length written in capital letters, up to its length: a dense
    signal that a random model already scores a little on (about 1 character in 10)."""
    scores = []
    for completion, expected in zip(completions, answer):
        head = completion[: len(expected)]
        scores.append(sum(c.isupper() for c in head) / len(expected))
    return scores
