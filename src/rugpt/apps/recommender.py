"""A recommender from a language model alone: list what a user liked, let the model go on, count the titles.

The seed names the domain and the liked items in quotes and ends with an opening quote, so every
sampled continuation starts with a title. Titles that come back in many samples are the
recommendations; with a catalogue only known items are kept (matched by normalised name, then fuzzily).
"""

from __future__ import annotations

import csv
import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rugpt.apps import TextGenerator, as_generator
from rugpt.errors import DataError, UsageError
from rugpt.generation import GenerationSettings
from rugpt.jsonl import iter_jsonl
from rugpt.models import LoadedModel
from rugpt.templates import Template

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
QUOTES = {"«»": ("«", "»"), '""': ('"', '"')}
DEFAULT_SEED_TEMPLATE = "Категория: {domain}.\nМне понравились: {items}.\nСоветую также: "
MAX_NAME_CHARS = 80  # longer "names" are runaway text between two unrelated quotes

# Any quote style, whichever the seed used: the model may switch. Names never span lines.
_QUOTED = re.compile(r"[«\"“„]([^«»\"“”„\n]+)[»\"”“]")
_LISTED = re.compile(r"^\s*(?:[-•*]|\d{1,2}[.)])\s+(.+?)\s*$", re.MULTILINE)
_EDGE_PUNCTUATION = " \t«»\"“”„'.,;:!?…"
_WORD = re.compile(r"\w+")


def normalize_name(name: str) -> str:
    """The comparison key of a title: lower case, ё → е, words only (quotes, dashes, punctuation, spacing dropped)."""
    return " ".join(_WORD.findall(name.lower().replace("ё", "е")))


def extract_names(text: str) -> list[str]:
    """Quoted names in `text`, plus bulleted or numbered list items on lines without quotes."""
    names = [m.strip() for m in _QUOTED.findall(text)]
    for item in _LISTED.findall(text):
        if not any(q in item for q in "«»\"“”„"):
            names.append(item.strip(_EDGE_PUNCTUATION))
    return [n for n in names if normalize_name(n) and len(n) <= MAX_NAME_CHARS]


@dataclass(frozen=True)
class CatalogueItem:
    """A known item as the catalogue spells it."""

    title: str
    year: int | None = None


class Catalogue:
    """Known items; `match` finds one by normalised title, then by fuzzy similarity."""

    def __init__(self, items: Sequence[CatalogueItem]):
        if not items:
            raise UsageError("the catalogue is empty: give at least one item")
        self.items = list(items)
        self._by_key: dict[str, CatalogueItem] = {}
        for item in self.items:  # remakes share a title: the first one listed stands for it
            self._by_key.setdefault(normalize_name(item.title), item)

    def __len__(self) -> int:
        return len(self.items)

    def match(self, name: str, min_similarity: float) -> CatalogueItem | None:
        key = normalize_name(name)
        if key in self._by_key:
            return self._by_key[key]
        close = difflib.get_close_matches(key, self._by_key, n=1, cutoff=min_similarity)
        return self._by_key[close[0]] if close else None

    @classmethod
    def load(cls, source: str | Path) -> Catalogue:
        """A CSV file with a `title` column (and optionally `year`), or the name of a shipped one (`films_ru`)."""
        path = Path(source)
        if not path.exists() and (DATA_DIR / f"{source}.csv").is_file():
            path = DATA_DIR / f"{source}.csv"
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                return cls(_read_catalogue_rows(csv.DictReader(f), path))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            shipped = ", ".join(sorted(p.stem for p in DATA_DIR.glob("*.csv")))
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            message = f"cannot read catalogue {str(source)!r} ({reason}); give a CSV file or one of: {shipped}"
            raise DataError(message) from None


def _read_catalogue_rows(reader: csv.DictReader, path: Path) -> list[CatalogueItem]:
    if not reader.fieldnames or "title" not in reader.fieldnames:
        raise DataError(f"{path}:1: the header must have a 'title' column (and optionally 'year')")
    items = []
    for row in reader:
        title, year = (row.get("title") or "").strip(), (row.get("year") or "").strip()
        if not title:
            raise DataError(f"{path}:{reader.line_num}: empty title")
        if year and not year.isdigit():
            raise DataError(f"{path}:{reader.line_num}: year {year!r} is not a number")
        items.append(CatalogueItem(title, int(year) if year else None))
    return items


@dataclass
class RecommenderSettings:
    """The seed, how many continuations to sample and how to keep the names found in them."""

    domain: str = field(default="фильмы", metadata={"help": "what is recommended: фильмы, музыка, книги, курсы ..."})
    samples: int = field(default=20, metadata={"help": "continuations to sample; each votes once per name"})
    top: int = field(default=10, metadata={"help": "how many recommendations to return"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens per sampled continuation"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; higher gives more variety"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass, (0, 1]"})
    seed: int | None = field(default=None, metadata={"help": "random seed: the same seed gives the same list"})
    quotes: str = field(default="«»", metadata={"help": "quotes around the liked items in the seed: «» or \"\""})
    seed_template: str = field(
        default=DEFAULT_SEED_TEMPLATE, metadata={"help": "the seed, with {items} and optionally {domain}"}
    )
    min_similarity: float = field(
        default=0.85, metadata={"help": "how close (0-1) a name must be to a catalogue title to count as it"}
    )

    def __post_init__(self) -> None:
        checks = [
            (bool(self.domain.strip()), "domain is empty: say what is recommended, e.g. 'фильмы'"),
            (self.samples >= 1, f"samples={self.samples} must be >= 1"),
            (self.top >= 1, f"top={self.top} must be >= 1"),
            (self.quotes in QUOTES, f"quotes={self.quotes!r} must be one of {', '.join(QUOTES)}"),
            (0 < self.min_similarity <= 1, f"min_similarity={self.min_similarity} must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        Template(self.seed_template).require({"items"}, {"items", "domain"})
        self.generation()  # validates the sampling fields with GenerationSettings' own rules

    def generation(self) -> GenerationSettings:
        # No repetition penalty: a list repeats its quotes and commas on purpose. A line ends the list.
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature, top_k=0,
            top_p=self.top_p, repetition_penalty=1.0, num_return_sequences=self.samples, seed=self.seed,
            stop=("\n",),
        )

    def build_seed(self, liked: Sequence[str]) -> str:
        """The left context: the domain, the liked items in quotes, and an opening quote to start a title."""
        open_quote, close_quote = QUOTES[self.quotes]
        items = ", ".join(f"{open_quote}{item.strip()}{close_quote}" for item in liked)
        return Template(self.seed_template).fill({"domain": self.domain, "items": items}) + open_quote


@dataclass
class Recommendation:
    """One recommended item and in how many sampled continuations it came back."""

    title: str
    votes: int
    year: int | None = None


@dataclass
class Recommendations:
    """The ranked items, the seed that produced them and the raw continuations (from the opening quote)."""

    seed: str
    items: list[Recommendation]
    samples: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecommenderEvaluation:
    """Hit rate@k: share of users with a hidden item in their top k; coverage: share of the catalogue recommended."""

    users: int
    k: int
    hidden_per_user: int
    hit_rate: float
    coverage: float | None
    distinct_recommended: int

    def to_dict(self) -> dict:
        return asdict(self)


class Recommender:
    """Recommends from a model's continuations; `model` may be any object with Generator's `generate`."""

    def __init__(self, model: TextGenerator | LoadedModel | str | None = None, catalogue: Catalogue | None = None):
        self.generator = as_generator(model)
        self.catalogue = catalogue

    def recommend(self, liked: Sequence[str], settings: RecommenderSettings | None = None) -> Recommendations:
        """Sample continuations of the seed, then rank the names in them by votes, without the liked ones."""
        settings = settings or RecommenderSettings()
        liked = list(liked)
        if not liked:
            raise UsageError("no liked items: give at least one thing the user liked")
        for number, item in enumerate(liked, start=1):
            if not item.strip():
                raise UsageError(f"liked item #{number} is empty")
        seed = settings.build_seed(liked)
        open_quote = QUOTES[settings.quotes][0]
        result = self.generator.generate(seed, settings.generation())
        samples = [open_quote + c.text for c in result.completions]
        ranked = self.rank([extract_names(s) for s in samples], liked, settings.min_similarity)
        return Recommendations(seed, ranked[: settings.top], samples)

    def rank(self, names_per_sample: Sequence[Sequence[str]], liked: Sequence[str],
             min_similarity: float) -> list[Recommendation]:
        """Count in how many samples each item appears (once per sample), most votes first, liked ones dropped."""
        known = {self._identify(name, min_similarity, liked=True)[0] for name in liked}
        votes: Counter[str] = Counter()
        shown: dict[str, tuple[str, int | None]] = {}  # key → (title, year) as first seen, in order
        for names in names_per_sample:
            # One vote per sample: a degenerate sample that repeats a title must not outvote the others.
            in_sample = {}
            for name in names:
                found = self._identify(name, min_similarity)
                if found is not None and found[0] not in known:
                    in_sample.setdefault(found[0], found[1:])
            for key, display in in_sample.items():
                votes[key] += 1
                shown.setdefault(key, display)
        order = sorted(shown, key=lambda key: -votes[key])  # stable: ties stay in order of first appearance
        return [Recommendation(shown[key][0], votes[key], shown[key][1]) for key in order]

    def _identify(self, name: str, min_similarity: float, liked: bool = False) -> tuple[str, str, int | None] | None:
        """(key, title, year) of a name, using the catalogue's entry when it has one; None if it has none.

        The user's own items are never None: unknown or not, they must be recognised to be left out.
        """
        if self.catalogue is not None:
            item = self.catalogue.match(name, min_similarity)
            if item is not None:
                return normalize_name(item.title), item.title, item.year
            if not liked:
                return None
        return normalize_name(name), name.strip(_EDGE_PUNCTUATION), None

    def evaluate(self, users: Sequence[Sequence[str]], settings: RecommenderSettings | None = None,
                 hide: int = 1) -> RecommenderEvaluation:
        """Hide each user's last `hide` items, recommend from the rest, count users whose hidden item comes back."""
        settings = settings or RecommenderSettings()
        if hide < 1:
            raise UsageError(f"hide={hide} must be >= 1")
        if not users:
            raise UsageError("no users to evaluate")
        hits, recommended = 0, set()
        for number, liked in enumerate(users, start=1):
            if len(liked) <= hide:
                raise UsageError(f"user #{number} has {len(liked)} liked item(s); hiding {hide} needs at least "
                                 f"{hide + 1}")
            result = self.recommend(liked[:-hide], settings)
            keys = {normalize_name(item.title) for item in result.items}
            hidden = {self._identify(name, settings.min_similarity, liked=True)[0] for name in liked[-hide:]}
            hits += bool(keys & hidden)
            recommended |= keys
        coverage = None if self.catalogue is None else len(recommended) / len(self.catalogue)
        return RecommenderEvaluation(len(users), settings.top, hide, hits / len(users), coverage, len(recommended))


def read_users(path: str | Path, field_name: str = "liked") -> list[list[str]]:
    """Users' liked items from a JSON Lines file: one object per user with a list of strings."""
    users = []
    for line, record in iter_jsonl(path):
        liked = record.get(field_name)
        if not isinstance(liked, list) or not liked or not all(isinstance(x, str) and x.strip() for x in liked):
            raise DataError(f"{path}:{line}: field {field_name!r} must be a non-empty list of non-empty strings")
        users.append(liked)
    if not users:
        raise DataError(f"{path}: no JSON objects in the file")
    return users


def recommend(
    liked: Sequence[str], model: TextGenerator | LoadedModel | str | None = None,
    catalogue: Catalogue | str | Path | None = None, **settings,
) -> Recommendations:
    """Recommend items like `liked` (the bundled model by default); `settings` are RecommenderSettings fields."""
    if catalogue is not None and not isinstance(catalogue, Catalogue):
        catalogue = Catalogue.load(catalogue)
    return Recommender(model, catalogue).recommend(liked, RecommenderSettings(**settings))
