"""Answer extraction from realistic completions (lesft.data.extract): pure Python, no model."""

from __future__ import annotations

import pytest

from lesft.data.extract import DATASETS, extract_answer, is_correct, normalize_number

# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

GSM8K_CASES = [
    # (completion, expected)
    ("Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so she has 16 - 3 - 4 = 9 eggs left.\n"
     "She sells them for $2 each, so she makes 9 * 2 = $18.\n#### 18", "18"),
    ("Natalia sold 48 / 2 = 24 clips in May.\nAltogether she sold 48 + 24 = 72 clips.\nThe answer is 72.", "72"),
    ("Weng earns 12 / 60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n"
     "The answer is $10.", "10"),
    ("The house cost 80,000 + 50,000 = $130,000 in total.\nIts value increased to 80,000 * 2.5 = 200,000.\n"
     "So the profit is 200,000 - 130,000 = 70,000.\n\nThe answer is $70,000.", "70000"),
    ("Step 1: 3 sprints * 3 times a week = 9 sprints.\nStep 2: 9 * 60 = 540 meters.\n\n**Answer:** 540", "540"),
    ("First, find the total: 20 + 15 = 35.\nThen subtract: 35 - 7 = 28.\n**Final Answer**\n\n28", "28"),
    ("Let's think step by step.\nShe buys 4 packs of 6 = 24 pencils, then gives away 5.\n"
     "24 - 5 = 19\nFinal answer: 19", "19"),
    ("The total cost is 3 * $4.50 = $13.50.\nThe answer is: 13.50", "13.5"),
    ("Each ticket is $12.00 and he buys 1 ticket, so the answer is $12.00.", "12"),
    ("The answer is 18. Let me double-check: 9 + 9 = 18, and 20 - 2 = 18. Yes, that's correct.", "18"),
    ("So 5 + 7 = 12 apples.\nThe answer is 12.\n\nNext question: Tom has 40 apples and gives away 15. "
     "How many are left? 40 - 15 = 25. The answer is 25.", "12"),
    ("Mark has 10 marbles and loses 3, so 10 - 3 = 7.\nThe answer is 7.\n\nQuestion: Lily has 5 cookies and "
     "bakes 8 more. How many does she have?\nAnswer: 5 + 8 = 13. The answer is 13.", "7"),
    ("The answer is 36. I hope this helps! Let me know if you have 2 more questions or need 10 more examples.", "36"),
    ("He drives 60 miles per hour for 3 hours, so 60 * 3 = 180 miles.\nThen he drives 2 more hours at 30 mph: "
     "30 * 2 = 60.\nTotal: 180 + 60 = 240 miles.\nThe final answer is $\\boxed{240}$.", "240"),
    ("We need $\\frac{3}{4}$ of 12, which is 9.\n\\boxed{9}", "9"),
    ("The temperature was 5 degrees and dropped by 8 degrees, so 5 - 8 = -3.\nThe answer is -3.", "-3"),
    ("The balance goes from 20 to 20 \u2212 25 = \u22125 dollars.\nThe answer is \u22125.", "-5"),
    ("Half of the 30 students, 15, passed, so the pass rate is 15 / 30 * 100 = 50%.\nThe answer is 50%.", "50"),
    ("The shirt costs $25 and is 20% off: 25 * 0.8 = 20.\nSo she pays $20 for the shirt.", "20"),
    ("James writes a 3-page letter to 2 friends twice a week.\n3 * 2 = 6 pages per letter round.\n"
     "6 * 2 = 12 pages per week.\n12 * 52 = 624 pages a year.", "624"),
    ("The pool holds 1,250 gallons and fills at 25 gallons per minute, so it takes 1,250 / 25 = 50 minutes.", "50"),
    ("Total = 1,234 + 2,000 = 3,234", "3234"),
    ("The answer is 1,234.56 dollars after all the deposits.", "1234.56"),
    ("The answer is 5 + 7 = 12.", "12"),
    ("Answer: Janet has 16 eggs. She eats 3 and bakes 4, leaving 16 - 3 - 4 = 9. "
     "She sells them for $2 each, making 9 * 2 = $18.", "18"),
    ("The answer is below.\nThere are 4 boxes with 6 crayons each, 4 * 6 = 24.", "24"),
    ("The answer is 0.75 because 3 / 4 = 0.75.", "0.75"),
    ("I'm not sure how to solve this problem. Could you give me more information?", None),
    ("", None),
    ("#### 1,000", "1000"),
    ("Each of the 7 days she reads 12 pages.\n7 * 12 = 84\n\n**84**", "84"),
    ("The answer is 18 apples. Wait, I made a mistake: she gave away 2 more, so 18 - 2 = 16.\n"
     "The answer is 16.", "16"),
    ("So he has 120 - 35 = 85 dollars left.\n\n### Answer: 85\n\nExplanation: 120 is the starting amount.", "85"),
    ("The answer is: $ 42.", "42"),
]


@pytest.mark.parametrize(("completion", "expected"), GSM8K_CASES)
def test_gsm8k(completion, expected):
    assert extract_answer("gsm8k", completion) == expected


# --------------------------------------------------------------------------------------------
# Synthetic arithmetic benchmark (targets end with "The answer is N.", references with "Answer: N")
# --------------------------------------------------------------------------------------------

SYNTHETIC_CASES = [
    ("Tom starts with 7 apples. He buys 5 more: 7 + 5 = 12. He ends up with 3 times as many: 12 * 3 = 36. "
     "The answer is 36.", "36"),
    ("7 + 5 = 12\n12 * 3 = 36\nAnswer: 36", "36"),
    ("Anna starts with 14 stickers. She gives away 6: 14 - 6 = 8. The answer is 8.\n\nQuestion: Sam has 3 "
     "coins. He finds 9 more.", "8"),
    ("Mia starts with 20 cookies. She keeps one of 4 equal piles: 20 / 4 = 5. The answer is 5. "
     "Check: 5 * 4 = 20.", "5"),
    ("Ben starts with 9 cards. He buys 11 more: 9 + 11 = 20. He sells 4: 20 - 4 = 16.", "16"),
    ("Lily starts with 3 marbles, 3 * 4 = 12, 12 + 7 = 19\nThe answer is 19", "19"),
    ("The answer is 24.0", "24"),
    ("Max starts with 6 books. He trades each one for 5: 6 * 5 = 30.\nThe answer is **30**.", "30"),
    ("Emma starts with 2 pencils. The number becomes 4 times as big", "4"),
    ("Sam starts with some coins and then buys more.", None),
    ("Tom starts with 8 apples. The answer is 8 + 9 = 17.", "17"),
]


@pytest.mark.parametrize(("completion", "expected"), SYNTHETIC_CASES)
def test_synthetic(completion, expected):
    assert extract_answer("synthetic", completion) == expected


# --------------------------------------------------------------------------------------------
# CommonsenseQA
# --------------------------------------------------------------------------------------------

CSQA_CASES = [
    ("A revolving door is convenient for two direction travel, but it also serves as a security measure at a "
     "bank. The answer is (A).", "A"),
    ("People go to the library to borrow books. So the answer is (c).", "C"),
    ("Answer: C", "C"),
    ("The best place to keep a dictionary is on a desk, so the answer is E", "E"),
    ("When you are tired you want to rest. The correct option is D", "D"),
    ("Sharks live in the ocean, not in a lake or a pool.\n(B) ocean", "B"),
    ("**Answer: E**", "E"),
    ("**Answer:** (B) library\n\nExplanation: a library lends books to people.", "B"),
    ("Option A", "A"),
    ("Children play in a park after school.\n\nB", "B"),
    ("A revolving door is found in a bank because of security.", None),
    ("The answer is: A revolving door is used for security.", None),
    ("a person who is hungry would go to the kitchen to eat", None),
    ("(A) and (B) are wrong, the answer is (C)", "C"),
    ("(A) bank is wrong because banks do not sell food. (B) mall could be right. "
     "(D) is too far away. So the answer is (B).", "B"),
    ("The answer is (C) school. School is where children learn, so school (C) is correct.", "C"),
    ("The answer is library (D). A library lends books.", "D"),
    ("I think the answer is likely B, since a cat chases mice.", "B"),
    ("The answer is A because a fox is a wild animal that lives in the forest.", "A"),
    ("So the answer is a.", "A"),
    ("So the answer is e", "E"),
    ("The answer is (C).\n\nOption A is incorrect because a desk is not a room. Option B is wrong too.", "C"),
    ("The answer is (B).\n\nQuestion: Where would you find a jellyfish?\nAnswer Choices: (A) ocean (B) pond\n"
     "A: The answer is (A).", "B"),
    ("Answer: Because people sleep when they are tired, they go to bed.", None),
    ("I would choose option D because a fridge keeps food cold.", "D"),
    ("I think (C) makes the most sense, since a kitchen is where food is cooked.", "C"),
    ("Let's look at each choice: bank, library, store. None of them fits well.", None),
    ("A) bank\nB) library\nC) school\nD) park\nE) zoo", None),
    ("Final answer: (D) forest", "D"),
    ("The answer is $\\boxed{E}$.", "E"),
    ("The correct answer is C) feeling happy.", "C"),
    ("Answer: D. A person who wins a race feels joy.", "D"),
    ("The answer is a bank, which is (A).", "A"),
]


@pytest.mark.parametrize(("completion", "expected"), CSQA_CASES)
def test_commonsenseqa(completion, expected):
    assert extract_answer("commonsenseqa", completion) == expected


# --------------------------------------------------------------------------------------------
# AQUA-RAT
# --------------------------------------------------------------------------------------------

AQUA_CASES = [
    ("Speed = 100 / 4 = 25 km/h.\nThe answer is B) 25", "B"),
    ("Let the number be x. Then 3x + 5 = 20, so x = 5.\nAnswer: Option C", "C"),
    ("Profit = 1200 - 1000 = 200. Profit % = 200 / 1000 * 100 = 20%.\nThe answer is (D) 20%.", "D"),
    ("A train 120 m long passes a pole in 6 seconds, so its speed is 120 / 6 = 20 m/s.\nAnswer: A", "A"),
    ("A train 120 m long passes a pole in 6 seconds, so its speed is 120 / 6 = 20 m/s = 72 km/h.", None),
    ("The simple interest is 5000 * 10 * 2 / 100 = 1000.\n**Answer: E**", "E"),
    ("Total ways = 5! / (2! * 3!) = 10.\nSo the correct answer is (b).", "B"),
    ("Average = (10 + 20 + 30) / 3 = 20.\nE) 20", "E"),
    ("x^2 - 5x + 6 = 0 gives x = 2 or x = 3. The sum is 5, which matches option B.", "B"),
    ("Option A: 21 is too small.\nOption B: 25 is too big.\nOption C: 23 fits.\nTherefore the answer is C.", "C"),
    ("The answer is (A).\n\nQuestion: A man buys a cycle for Rs. 1400 and sells it at a loss of 15%.\n"
     "Answer: Option B", "A"),
    ("(A) and (B) give negative values, (E) is too large, so the answer is (C)", "C"),
    ("The cost price is 800 / 1.25 = 640.\nThe answer is C", "C"),
    ("A man walks 5 km north and 12 km east. The distance is sqrt(25 + 144) = 13 km.\nThe answer is D.", "D"),
    ("A number is divisible by 9 if the sum of its digits is.\n\nThe answer is: E", "E"),
    ("The ratio is 3:4, so the larger part is 70 * 4 / 7 = 40.\nThe answer is (c) 40", "C"),
    ("Let the speed of the boat be b. b + 2 = 12, so b = 10.\nAnswer: (A) 10 km/h", "A"),
    ("Rate = 6 / 3 = 2 units per hour.\nAnswer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5\nThe answer is B.", "B"),
    ("Area = 1/2 * 6 * 8 = 24.\n\nC", "C"),
    ("Area = 1/2 * 6 * 8 = 24.\n\nc", "C"),
    ("The probability is 1/6.\n\nFinal answer: D", "D"),
    ("I'm not sure which option is correct.", None),
    ("The answer is 24.", None),
    ("The correct option is E) 1/6", "E"),
    ("The interest is 10%. A bank pays this yearly, so the answer is (E).", "E"),
    ("The answer is A) 42. Let me verify: 6 * 7 = 42. Option B is 48, which is wrong.", "A"),
    ("So the answer is D. Option E is 60 but that would need a 20% increase.", "D"),
    ("The answer is B\n\nExplanation: The train covers 300 m in 15 s, i.e. 20 m/s. A faster train would take less.", "B"),
    ("The length is 150 m.\n(D) 150 m", "D"),
    ("The time taken is 12 hours. Hence, the correct choice is (A).", "A"),
    ("So x = 4 and y = 6.\nB - 10", "B"),
    ("The answer is A - 8 hours.", "A"),
]


@pytest.mark.parametrize(("completion", "expected"), AQUA_CASES)
def test_aqua_rat(completion, expected):
    assert extract_answer("aqua_rat", completion) == expected


# --------------------------------------------------------------------------------------------
# normalize_number, is_correct, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", "1234"), ("$18.00", "18"), ("18.0", "18"), ("-3.50", "-3.5"), ("\u22123", "-3"),
        ("50%", "50"), (".5", "0.5"), ("1 000", "1000"), ("18.", "18"), ("**18**", "18"), ("(18)", "18"),
        ("100", "100"), ("0.10", "0.1"), ("-0", "0"), ("1/2", "0.5"), ("6/4", "1.5"), ("2/6", "1/3"),
        ("\\frac{3}{4}", "0.75"), ("1/0", None), ("abc", None), ("", None), ("18 apples", None), ("1e3", None),
        ("1,23", None), ("--5", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("dataset", "predicted", "gold", "expected"),
    [
        ("gsm8k", "18", "18.0", True),
        ("gsm8k", "18", "180", False),
        ("gsm8k", "1234", "1,234", True),
        ("gsm8k", "0.5", "1/2", True),
        ("gsm8k", "-3", "3", False),
        ("gsm8k", None, "18", False),
        ("gsm8k", "18", "She makes 9 * 2 = $18 every day.\n#### 18", True),
        ("synthetic", "36", "36", True),
        ("synthetic", "36.0", "36", True),
        ("commonsenseqa", "c", "C", True),
        ("commonsenseqa", "(C)", "C", True),
        ("commonsenseqa", "B", "C", False),
        ("commonsenseqa", None, "C", False),
        ("aqua_rat", "e", "E", True),
        ("aqua_rat", "A", "E", False),
    ],
)
def test_is_correct(dataset, predicted, gold, expected):
    assert is_correct(dataset, predicted, gold) is expected


def test_extract_then_compare():
    predicted = extract_answer("gsm8k", "She makes 9 * 2 = $18.00 a day.\nThe answer is $18.00.")
    assert is_correct("gsm8k", predicted, "18")
    assert not is_correct("gsm8k", extract_answer("gsm8k", "I don't know."), "18")


@pytest.mark.parametrize("call", [
    lambda: extract_answer("mmlu", "The answer is (A)."),
    lambda: is_correct("gsm8k_hard", "1", "1"),
])
def test_unknown_dataset(call):
    with pytest.raises(ValueError, match="unknown benchmark .*known: gsm8k, commonsenseqa, aqua_rat, synthetic"):
        call()


def test_datasets():
    assert DATASETS == ("gsm8k", "commonsenseqa", "aqua_rat", "synthetic")
