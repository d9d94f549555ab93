"""The player's words into the story's voice: «я беру меч» → «Вы берёте меч.», «Привет» → «Вы говорите: «Привет».»

Russians type actions in the first person; the story is told in the second person plural, as gamio did.
pymorphy3 finds each verb's lemma and inflects it, so irregular verbs come out right (есть → едите,
бежать → бежите, давать → даёте). Quoted speech inside an action is left as the player wrote it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rugpt.apps.adventure.morphology import parses

WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")
SENTENCE_END = re.compile(r"[.!?…]")
OPEN_QUOTES, CLOSE_QUOTES, BOTH_QUOTES = "«„“", "»”", '"'
CLOSERS = "»”\")'"

PRONOUNS = {"я": "вы", "меня": "вас", "мне": "вам", "мной": "вами", "мною": "вами"}
# "со мной" → "с вами": these prepositions take their -о only before "мн-".
O_PREPOSITIONS = {"со": "с", "ко": "к", "обо": "о", "во": "в", "подо": "под", "надо": "над",
                  "передо": "перед", "предо": "пред", "изо": "из"}
# Words whose likeliest parse is another verb than the one players mean: "пою" is usually петь, not поить.
HOMOGRAPHS = {"пою": "поёте"}
# After these the next verb has a new subject ("я вижу, как стражник упал"), so past tense stays as it is.
SUBORDINATORS = frozenset("что как когда где куда откуда который которая которое которые которого которой "
                          "которым если чтобы пока почему зачем кто чей будто словно".split())
OTHER_SUBJECTS = frozenset("он она оно они мы ты кто".split())
JOINERS = frozenset("и а но затем потом".split())
LEAD_IN = frozenset({"ADVB", "PRCL", "CONJ", "PRED", "INTJ"})  # words that may stand before "Вы" is added


@dataclass
class _Sentence:
    """What the rewriter knows about the sentence it is in."""

    first_word: int | None = None  # index of the sentence's first word piece
    has_subject: bool = False  # the player wrote "я" (or "вы")
    has_verb: bool = False  # a verb of the player's has been turned already
    expect_verb: bool = True  # the next verb-like word is the player's action
    lead_in_only: bool = True  # every word before the first verb is an adverb, particle or conjunction


@dataclass
class _Rewriter:
    pieces: list[str]
    out: list[str] = field(default_factory=list)
    prefix: dict[int, str] = field(default_factory=dict)  # text inserted before piece i
    quote_depth: int = 0
    sentence: _Sentence = field(default_factory=_Sentence)

    def run(self) -> str:
        self.out = list(self.pieces)
        for i, piece in enumerate(self.pieces):
            if WORD.fullmatch(piece):
                if self.quote_depth == 0:
                    self._word(i, piece)
            else:
                self._gap(piece)
        return "".join(self.prefix.get(i, "") + piece for i, piece in enumerate(self.out))

    def _gap(self, piece: str) -> None:
        for char in piece:
            if char in OPEN_QUOTES:
                self.quote_depth += 1
            elif char in CLOSE_QUOTES:
                self.quote_depth = max(0, self.quote_depth - 1)
            elif char in BOTH_QUOTES:
                self.quote_depth = 0 if self.quote_depth else 1
        if self.quote_depth:
            return
        if SENTENCE_END.search(piece):
            self.sentence = _Sentence()
        elif any(c in piece for c in ",;:—–"):
            self.sentence.expect_verb = True  # a new clause, most likely of the same subject

    def _word(self, i: int, word: str) -> None:
        low = word.lower()
        sentence = self.sentence
        at_start = sentence.first_word is None
        if at_start:
            sentence.first_word = i
        if low in PRONOUNS:
            self._pronoun(i, low, at_start)
        elif low == "вы":
            sentence.has_subject = sentence.expect_verb = True
        elif (possessive := _possessive(low, sentence.expect_verb)) is not None:
            self.out[i] = _match_case(word, possessive)
        elif (verb := _verb_form(low, sentence.expect_verb, at_start)) is not None:
            self._verb(i, word, verb)
        elif low in JOINERS:
            sentence.expect_verb = True
        elif low in SUBORDINATORS or low in OTHER_SUBJECTS:
            sentence.expect_verb = False
        if not sentence.has_verb and parses(low)[0].tag.POS not in LEAD_IN:
            sentence.lead_in_only = False

    def _pronoun(self, i: int, low: str, at_start: bool) -> None:
        replacement = PRONOUNS[low]
        self.out[i] = replacement.capitalize() if at_start else replacement
        if low == "я":
            self.sentence.has_subject = self.sentence.expect_verb = True
            return
        before = i - 2  # pieces alternate word / gap: the word before, if only a space lies between
        if before >= 0 and self.pieces[i - 1].isspace() and self.out[before].lower() in O_PREPOSITIONS:
            self.out[before] = _match_case(self.out[before], O_PREPOSITIONS[self.out[before].lower()])

    def _verb(self, i: int, word: str, form: str) -> None:
        sentence = self.sentence
        self.out[i] = _match_case(word, form)
        if not sentence.has_subject and not sentence.has_verb:
            self._add_subject(i)
        sentence.has_verb, sentence.expect_verb = True, False

    def _add_subject(self, verb: int) -> None:
        """'Открываю дверь' has no 'я': add 'Вы' at the start, or 'вы' before the verb after a noun."""
        sentence = self.sentence
        if sentence.lead_in_only:
            first = sentence.first_word
            self.prefix[first] = "Вы "
            self.out[first] = _lower_first(self.out[first])
            return
        at = verb - 2 if verb >= 2 and self.out[verb - 2].lower() == "не" else verb
        self.prefix[at] = "вы "


def _verb_form(low: str, expect_verb: bool, at_start: bool) -> str | None:
    """The second-person plural of a first-person (or past, or at the start infinitive) verb, else None."""
    if low in HOMOGRAPHS:
        return HOMOGRAPHS[low]
    options = parses(low)
    top = options[0]
    first_person = next((p for p in options if p.tag.POS == "VERB" and {"1per", "sing"} in p.tag), None)
    if first_person is not None and (expect_verb or first_person is top):
        return _inflect(first_person, {"2per", "plur"})
    if not expect_verb:
        return None
    if top.tag.POS == "VERB" and {"past", "sing"} in top.tag:
        return _inflect(top, {"plur"})
    if top.tag.POS == "ADJS" and "sing" in top.tag:  # "я готов" → "вы готовы"
        return _inflect(top, {"plur"})
    if at_start and (top.tag.POS == "INFN" or (top.tag.POS == "VERB" and "impr" in top.tag)):
        infinitive = next((p for p in parses(top.normal_form) if p.tag.POS == "INFN"), None)
        return _inflect(infinitive, {"2per", "plur"}) if infinitive is not None else None
    return None


def _possessive(low: str, expect_verb: bool) -> str | None:
    """'мою' → 'вашу' in the same case, number and gender; None when the word is not 'мой' (or is мыть)."""
    top = parses(low)[0]
    if top.normal_form != "мой" or top.tag.POS != "ADJF":
        return None
    if expect_verb and any(p.tag.POS == "VERB" and "1per" in p.tag for p in parses(low)):
        return None  # "я мою руки": here it is the verb мыть
    grammemes = {g for g in (top.tag.case, top.tag.number, top.tag.gender, top.tag.animacy) if g}
    return _inflect(parses("ваш")[0], grammemes)


def _inflect(parse, grammemes: set[str]) -> str | None:
    form = parse.inflect(grammemes)
    return form.word if form is not None else None


def _match_case(original: str, word: str) -> str:
    return word[:1].upper() + word[1:] if original[:1].isupper() else word


def _lower_first(word: str) -> str:
    if word.isupper() and len(word) > 1:
        return word  # an abbreviation
    tags = parses(word.lower())[0].tag
    return word if {"Name", "Surn", "Patr", "Geox", "Orgn"} & set(tags.grammemes) else word[:1].lower() + word[1:]


def _pieces(text: str) -> list[str]:
    """Alternating gap, word, gap, word, ..., gap (gaps may be empty)."""
    pieces, at = [], 0
    for match in WORD.finditer(text):
        pieces += [text[at : match.start()], match.group()]
        at = match.end()
    return [*pieces, text[at:]]


def finish_sentence(text: str) -> str:
    """Capitalised, with a full stop added when the text does not end a sentence already."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if SENTENCE_END.search(text.rstrip(CLOSERS)[-1:]) else text + "."


def to_second_person(text: str) -> str:
    """Rewrite a first-person action into the second person: «я открываю дверь» → «Вы открываете дверь.»"""
    text = " ".join(text.split())
    if not text:
        return text
    return finish_sentence(_Rewriter(_pieces(text)).run())


def as_speech(text: str) -> str:
    """The player's line as said aloud: «Вы говорите: «Кто здесь?»» (a final full stop moves outside)."""
    line = " ".join(text.split()).strip("«»\"„“”")
    if line.endswith(".") and not line.endswith(".."):
        line = line[:-1]
    if not line:
        return ""
    closing = "»" if re.search(r"[!?…]$|\.\.$", line) else "»."
    return f"Вы говорите: «{line[0].upper() + line[1:]}{closing}"
