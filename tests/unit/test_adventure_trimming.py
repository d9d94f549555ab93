"""The model's text is cut after its last complete sentence, with Russian punctuation."""

import pytest

from rugpt.apps.adventure.trimming import trim_to_sentence

CASES = [
    ("Он ушёл. А потом", "Он ушёл."),
    (" За дверью темно. Слы", "За дверью темно."),
    ("Он ушёл.", "Он ушёл."),
    ("Вопрос?! Ответ", "Вопрос?!"),
    ("Что?.. Не знаю", "Что?.."),
    ("Он ушёл... А потом", "Он ушёл..."),  # three dots
    ("Он ушёл… Потом вернулся и", "Он ушёл…"),  # the ellipsis character
    ("Я... я не знаю. Он", "Я... я не знаю."),  # an ellipsis before a small letter ends nothing
    ("Он сказал: «Иди!» И", "Он сказал: «Иди!»"),  # «» quotes close the sentence with it
    ("Она шепнула: «Уходи». Он", "Она шепнула: «Уходи»."),
    ("Он сказал: «Иди сюда. Быстро", "Он сказал: «Иди сюда.»"),  # an open quote is closed
    ("— Иди сюда, — сказал он. — Я", "— Иди сюда, — сказал он."),  # a dash opening a new remark
    ("— Стой! — крикнул он. Потом", "— Стой! — крикнул он."),  # a dash before the author's words
    ("Конец.\nНачало", "Конец."),
    ("Пушкин А. С. написал", "Пушкин А. С. написал"),  # initials end no sentence
    ("Он жил на ул. Ленина. Там", "Он жил на ул. Ленина."),  # nor abbreviations
    ("Число 3.14 и", "Число 3.14 и"),
    ("Без точки совсем", "Без точки совсем"),  # no complete sentence: the text as it is
    ("", ""),
]


@pytest.mark.parametrize(("raw", "trimmed"), CASES)
def test_trim_to_last_complete_sentence(raw, trimmed):
    assert trim_to_sentence(raw) == trimmed
