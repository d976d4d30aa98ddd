"""Prompt builders with random content: math word problems, reasoning puzzles and code tasks.

Each builder takes a `random.Random` and returns one user message. All templates are written for this project.
"""

from __future__ import annotations

import random

from tandem_tools.distill.vocab import NAMES

ITEMS = (("notebooks", 2.5), ("pens", 1.2), ("apples", 0.4), ("coffees", 3.75), ("sandwiches", 5.5), ("tickets", 12.0))
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _two(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


def math_problem(rng: random.Random) -> str:
    kind = rng.randrange(10)
    a, b = _two(rng)
    if kind == 0:
        (item, price), (item2, price2) = rng.sample(ITEMS, 2)
        n, m, bill = rng.randint(2, 9), rng.randint(2, 4), rng.choice((20, 50, 100))
        return (
            f"{a} buys {n} {item} at ${price:.2f} each and {m} {item2} at ${price2:.2f} each, "
            f"and pays with a ${bill} bill. How much change does {a} get?"
        )
    if kind == 1:
        dist, hours, later = rng.randint(60, 600), rng.choice((1.5, 2, 2.5, 3, 4, 5)), rng.randint(2, 8)
        return (
            f"A train travels {dist} km in {hours} hours. What is its average speed, "
            f"and how far would it go in {later} hours at that speed?"
        )
    if kind == 2:
        diff, total = rng.randint(2, 12), rng.randint(20, 90)
        total += (total + diff) % 2  # keep the answer whole
        return f"{a} is {diff} years older than {b}. Together their ages add up to {total}. How old is each of them?"
    if kind == 3:
        w, h, cost = rng.randint(3, 40), rng.randint(3, 40), rng.randint(5, 30)
        return (
            f"A rectangular garden is {w} m long and {h} m wide. What are its area and its perimeter? "
            f"Fencing costs ${cost} per metre; how much does it cost to fence the whole garden?"
        )
    if kind == 4:
        price, pct, tax = rng.randint(20, 400), rng.choice((10, 15, 20, 25, 30, 40)), rng.choice((5, 8, 10))
        return (
            f"A jacket costs ${price}. It is on sale for {pct}% off, and then a {tax}% sales tax is added "
            "to the sale price. What is the final price?"
        )
    if kind == 5:
        r = rng.randint(2, 20)
        return f"What are the area and circumference of a circle with a radius of {r} cm? Use pi = 3.14 and show steps."
    if kind == 6:
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        return (
            f"{a} can paint a fence in {x} hours and {b} can paint the same fence in {y} hours. "
            "How long will it take if they work together?"
        )
    if kind == 7:
        scores = [rng.randint(50, 100) for _ in range(rng.randint(4, 6))]
        goal = min(100, sum(scores) // len(scores) + rng.randint(2, 6))
        return (
            f"{a}'s test scores are {', '.join(map(str, scores))}. What is the average score, and what score "
            f"is needed on the next test to raise the average to {goal}?"
        )
    if kind == 8:
        start, rate, years = rng.randint(500, 5000), rng.choice((2, 3, 4, 5, 6)), rng.randint(2, 5)
        return (
            f"{a} puts ${start} in a savings account that pays {rate}% interest per year, compounded yearly. "
            f"How much is in the account after {years} years?"
        )
    base, pct = rng.randint(80, 2000), rng.randint(5, 60)
    return (
        f"A town had {base} residents last year and {base + base * pct // 100} this year. "
        "By what percentage did the population grow? Round to one decimal place."
    )


def _sequence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        s, d = rng.randint(-10, 30), rng.randint(2, 13)
        seq = [s + d * i for i in range(5)]
    elif kind == 1:
        s, r = rng.randint(1, 5), rng.choice((2, 3, 4))
        seq = [s * r**i for i in range(5)]
    elif kind == 2:
        s = rng.randint(1, 6)
        seq = [(s + i) ** 2 for i in range(5)]
    else:
        x, y = rng.randint(1, 5), rng.randint(1, 5)
        seq = [x, y]
        for _ in range(4):
            seq.append(seq[-1] + seq[-2])
    return f"What number comes next in the sequence {', '.join(map(str, seq))}? Explain the pattern."


ADJECTIVES = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest"))
RULES = (
    ("it rains", "the football match is cancelled", "The match was not cancelled"),
    ("the fire alarm rings", "everyone leaves the building", "Nobody left the building"),
    ("a number is divisible by 6", "it is divisible by 3", "The number 20 is not divisible by 3"),
    ("the plant gets no water", "its leaves turn yellow", "The leaves are still green"),
    ("the bridge is closed", "the bus takes the long route", "The bus took the short route"),
)
NONSENSE = ("bloops", "razzies", "lazzles", "quibs", "morks", "tindles", "zorps", "fennels")
ODD_GROUPS = (
    ("apple", "banana", "cherry", "mango", "carrot"),
    ("violin", "cello", "trumpet", "guitar", "carpet"),
    ("Paris", "Madrid", "Berlin", "Rome", "Amazon"),
    ("circle", "square", "triangle", "hexagon", "purple"),
    ("oak", "pine", "maple", "birch", "salmon"),
    ("copper", "iron", "silver", "gold", "granite"),
)


def reasoning_puzzle(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        people = rng.sample(NAMES, rng.choice((3, 4)))
        comp, most, least = rng.choice(ADJECTIVES)
        facts = [f"{people[i]} is {comp} than {people[i + 1]}" for i in range(len(people) - 1)]
        rng.shuffle(facts)
        return f"{'. '.join(facts)}. Who is the {rng.choice((most, least))}? Explain your reasoning."
    if kind == 1:
        return _sequence(rng)
    if kind == 2:
        a, b, c = rng.sample(NONSENSE, 3)
        q = rng.choice((f"Are all {a} {c}?", f"Can we conclude that some {c} are {a}?", f"Are all {c} {a}?"))
        return f"All {a} are {b}. All {b} are {c}. {q} Answer yes or no and explain."
    if kind == 3:
        day, n = rng.choice(DAYS), rng.randint(3, 100)
        return f"If today is {day}, what day of the week will it be in {n} days?"
    if kind == 4:
        group = list(rng.choice(ODD_GROUPS))
        rng.shuffle(group)
        return f"Which word does not belong with the others, and why: {', '.join(group)}?"
    if kind == 5:
        cond, result, observed = rng.choice(RULES)
        if rng.random() < 0.5:
            return f"Rule: if {cond}, then {result}. {observed}. What can we conclude, and why?"
        return f"Rule: if {cond}, then {result}. We know that {result}. Can we conclude that {cond}? Explain."
    a, b, c = rng.sample(NAMES, 3)
    pets = rng.sample(("a cat", "a dog", "a parrot", "a rabbit", "a turtle"), 3)
    return (
        f"{a}, {b} and {c} each own exactly one pet: {', '.join(pets)}. {a} does not own {pets[0]}. "
        f"{b} owns {pets[1]}. Who owns {pets[2]}, if {c} does not own it? Explain step by step."
    )


PY_TASKS = (
    ("is_palindrome", "checks whether a string reads the same forwards and backwards, ignoring case and spaces"),
    ("second_largest", "returns the second largest distinct number in a list"),
    ("word_counts", "counts how often each word appears in a text"),
    ("flatten", "flattens a list of lists by one level"),
    ("chunked", "splits a list into chunks of size n"),
    ("merge_intervals", "merges overlapping (start, end) intervals"),
    ("to_snake_case", "converts a CamelCase name to snake_case"),
    ("fizzbuzz", "returns the FizzBuzz strings from 1 to n"),
    ("gcd", "computes the greatest common divisor of two integers"),
    ("is_prime", "tests whether an integer is prime"),
    ("rotate", "rotates a list k places to the right"),
    ("unique_in_order", "removes duplicates from a list while keeping the first occurrence order"),
    ("parse_duration", "parses strings like '1h30m' into a number of seconds"),
    ("read_csv_column", "reads one named column from a CSV file"),
    ("roman_to_int", "converts a Roman numeral to an integer"),
    ("binary_search", "finds the index of a value in a sorted list, or -1"),
)
JS_TASKS = (
    ("debounce", "delays calling a function until it has not been called for a given number of milliseconds"),
    ("capitalize", "capitalises the first letter of every word in a string"),
    ("groupBy", "groups an array of objects by the value of a key"),
    ("sumDigits", "adds up the digits of a number"),
    ("deepClone", "makes a deep copy of a plain object"),
    ("range", "returns an array of integers from start to end with a step"),
    ("isValidEmail", "does a simple check that a string looks like an email address"),
    ("countVowels", "counts the vowels in a string"),
)
SQL_SCHEMAS = (
    ("orders(id, customer_id, total, created_at)", ("the 5 largest orders", "the total revenue per month")),
    (
        "employees(id, name, department, salary)",
        ("the average salary per department", "employees earning above their department's average"),
    ),
    ("books(id, title, author, year, copies)", ("authors with more than three books", "books published before 1950")),
    ("visits(id, page, user_id, visited_at)", ("the number of distinct users per page", "the busiest hour of the day")),
)
SHELL_TASKS = (
    "finds all .log files larger than 10 MB under the current directory",
    "counts the lines in every .py file in a folder",
    "renames every .jpeg file in a folder to .jpg",
    "shows the 10 largest files in the home directory",
    "prints the 5 most common words in a text file",
    "backs up a folder into a dated tar.gz archive",
    "lists the processes using the most memory",
    "replaces the word 'colour' with 'color' in all .txt files",
)
SIGNATURE_QUESTIONS = (
    "What does the Python standard library function {} do? Give a short example.",
    "Explain the parameters of {} from the Python standard library, with a short example.",
    "When would I use {} in Python? Show a small example.",
)
MODIFIERS = (
    "",
    " Add type hints.",
    " Include a docstring and one example.",
    " Explain the time complexity.",
    " Keep it short.",
)
SNIPPETS = (
    ("Python", "def f(xs):\n    return {x: xs.count(x) for x in set(xs)}"),
    ("Python", "with open('data.txt') as fh:\n    total = sum(int(line) for line in fh if line.strip())"),
    ("Python", "result = sorted(people, key=lambda p: (p['age'], p['name']))"),
    ("JavaScript", "const evens = nums.filter(n => n % 2 === 0).map(n => n * n);"),
    ("JavaScript", "fetch(url).then(r => r.json()).then(data => console.log(data.items.length));"),
    ("SQL", "SELECT city, COUNT(*) AS n FROM customers GROUP BY city HAVING COUNT(*) > 10 ORDER BY n DESC;"),
    ("shell", "find . -name '*.tmp' -mtime +7 -delete"),
    ("shell", "cat access.log | cut -d' ' -f1 | sort | uniq -c | sort -rn | head"),
)
BUGGY = (
    ("average of a list", "def average(xs):\n    return sum(xs) / len(xs) - 1"),
    ("reverse a string", "def reverse(s):\n    return s[::1]"),
    (
        "largest number in a list",
        "def largest(xs):\n    best = 0\n    for x in xs:\n        if x > best:\n            best = x\n    return best",
    ),
    ("append an item to a new list", "def add_item(item, items=[]):\n    items.append(item)\n    return items"),
    ("factorial", "def factorial(n):\n    if n == 0:\n        return 0\n    return n * factorial(n - 1)"),
    ("count down from n to 1", "function countdown(n) {\n  for (let i = n; i > 0; i++) console.log(i);\n}"),
)


def code_task(rng: random.Random, signatures: list[tuple[str, str]]) -> str:
    kind = rng.randrange(7)
    mod = rng.choice(MODIFIERS)
    if kind in (0, 1):
        name, desc = rng.choice(PY_TASKS)
        return f"Write a Python function `{name}` that {desc}.{mod}"
    if kind == 2:
        name, desc = rng.choice(JS_TASKS)
        return f"Write a JavaScript function `{name}` that {desc}.{mod if 'type' not in mod else ''}"
    if kind == 3:
        schema, queries = rng.choice(SQL_SCHEMAS)
        return f"Given a table {schema}, write an SQL query that returns {rng.choice(queries)}."
    if kind == 4:
        return f"Write a shell command that {rng.choice(SHELL_TASKS)}. Explain each part."
    if kind == 5:
        if rng.random() < 0.5:
            lang, code = rng.choice(SNIPPETS)
            return f"Explain what this {lang} code does:\n\n```\n{code}\n```"
        what, code = rng.choice(BUGGY)
        return f"This function should compute the {what}, but it has a bug. Find and fix it:\n\n```\n{code}\n```"
    if not signatures:
        return f"Write a Python function `{rng.choice(PY_TASKS)[0]}`.{mod}"
    qual, sig = rng.choice(signatures)
    return rng.choice(SIGNATURE_QUESTIONS).format(f"`{qual}{sig}`")
