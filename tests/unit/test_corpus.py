from rugpt.training.corpus import clean_fortune, clean_text, is_heldout, iter_ruslit


def test_clean_text_drops_noise_and_keeps_paragraphs():
    raw = "Глава 1\n\n  12  \n-----------\nОн  сказал[3]: «Да»\t—\u00a0нет.\n*  *  *\nКонец—————————"
    assert clean_text(raw) == "Глава 1\nОн сказал: «Да» — нет.\nКонец———"


def test_heldout_split_is_stable_and_near_the_fraction():
    names = [f"doc{i}" for i in range(4000)]
    held = [n for n in names if is_heldout(n, 0.05)]
    assert held == [n for n in names if is_heldout(n, 0.05)]
    assert 120 < len(held) < 280


def test_fortune_keeps_author_on_its_own_line():
    entry = "Новые обещания - это\nзабытые старые.\n\t\t-- Евгений Кащеев"
    assert clean_fortune(entry) == "Новые обещания - это забытые старые.\n— Евгений Кащеев"


def test_ruslit_reads_real_files(shared_data):
    docs = iter_ruslit(shared_data / "ruslit")
    first = next(docs)
    assert first.source.startswith("ruslit/") and len(first.text) > 100
