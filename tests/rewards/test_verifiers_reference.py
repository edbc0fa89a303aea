r"""Reference extraction on real GSM8K / MATH formats: the answer is after "####" or in \boxed{}.

Regression for issue 14 item 1: the reference used to be the solution's *first* number, so on a
GSM8K solution the right answer scored 0 and an intermediate value scored 1.
"""

from fractions import Fraction

import pytest

from psirl.rewards.verifiers import AnswerVerifier, extract_reference, reference_number

# GSM8K train[0] (MIT), verbatim format: calculator annotations <<...>> and a final "#### N".
GSM8K_NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
# A multi-step GSM8K-style solution whose answer has a thousands separator and a dollar sign.
GSM8K_WAGES = (
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n"
    "In a year she earns 10 * 52 * 2 = $<<10*52*2=1040>>1,040.\n#### 1,040"
)
# MATH-format solution: intermediate numbers, the answer in the last \boxed{} (a fraction).
MATH_FRACTION = (
    "There are $\\binom{6}{2} = 15$ pairs, and $3$ of them are adjacent, so the probability "
    "is $1 - \\frac{3}{15} = \\boxed{\\frac{4}{5}}$."
)
MATH_NESTED = "We get $x = 2$ or $x=-7$, and the larger is $\\boxed{2}$, not $\\boxed{-7}$... "


@pytest.mark.parametrize(
    "reference, value",
    [
        (GSM8K_NATALIA, Fraction(72)),
        (GSM8K_WAGES, Fraction(1040)),
        (MATH_FRACTION, Fraction(4, 5)),
        ("42", Fraction(42)),
        ("-3/4", Fraction(-3, 4)),
        ("The answer is 17 apples.", Fraction(17)),
        ("First 3 then 5, finally 9", Fraction(9)),
    ],
)
def test_reference_number_takes_the_final_answer(reference, value):
    assert reference_number(reference) == value


def test_last_boxed_wins_in_math_solutions():
    assert extract_reference(MATH_NESTED) == "-7"


def test_first_number_bug_regression_gsm8k():
    """The right answer scores 1 and the intermediate value (the old 'reference') scores 0."""
    verifier = AnswerVerifier()
    records = [{"answer": GSM8K_NATALIA}] * 3
    completions = ["She sold 24 then 72 in total. The answer is 72", "#### 24", "24"]
    assert verifier(["q"] * 3, completions, records) == [1.0, 0.0, 0.0]
    assert verifier.score("#### 1040", GSM8K_WAGES) == 1.0
    assert verifier.score("the answer is 0.2", GSM8K_WAGES) == 0.0
    assert verifier.score("\\boxed{0.8}", MATH_FRACTION) == 1.0
    assert verifier.score("\\boxed{3/15}", MATH_FRACTION) == 0.0


def test_exact_mode_reads_hashes_and_boxed_references():
    verifier = AnswerVerifier(mode="exact")
    assert verifier.score("Answer: Paris", "Some reasoning about France.\n#### Paris") == 1.0
    assert verifier.score("Answer: Lyon", "Some reasoning about France.\n#### Paris") == 0.0
    assert verifier.score("\\boxed{x+1}", "so it is \\boxed{x+1}") == 1.0
