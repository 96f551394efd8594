"""The embedded demo: a seeded toy NLI dataset with an MNLI-like shortcut, and its tokenizer.

Premise/hypothesis pairs come from a small English grammar (people nouns, transitive and
intransitive verbs with synonym groups, adjectives with synonyms and antonyms, prepositional
phrases, relative clauses, passives, conjunctions, adverbs, subordinate and embedded clauses).
Labels are 2-way: 0 = entailment, 1 = non-entailment.

The training and dev splits carry the spurious shortcut that MNLI carries: when every word of the
hypothesis occurs in the premise, the pair is entailment with probability ``shortcut`` (0.93 by
default); the few high-overlap non-entailments are the HANS-style cases (swapped arguments,
subsequences that are not constituents, clauses under 'if' or 'probably', ...). Low-overlap pairs
are mostly non-entailment, for real reasons (negation, another noun or verb, an antonym, an
unrelated sentence), and partly entailment (synonyms, 'someone', active/passive rewrites). A model
can thus score high in distribution partly by counting overlap.

The challenge split is HANS-shaped: every hypothesis word occurs in its premise, half the pairs are
non-entailment, grouped by ``heuristic`` (lexical_overlap, subsequence, constituent) and ``subcase``,
so the overlap shortcut is right on only the entailed half.

Everything is pure Python (``random.Random`` seeded by split and seed): the same seed gives the same
frames on any machine, and nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from fastif.errors import ConfigError

ENTAILMENT = 0
NON_ENTAILMENT = 1
LABEL_NAMES = ("entailment", "non-entailment")
SPLITS = ("train", "dev", "challenge")
HEURISTICS = ("lexical_overlap", "subsequence", "constituent")
COLUMNS = ("id", "premise", "hypothesis", "label", "label_name", "heuristic", "subcase", "overlap")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_SHORTCUT = 0.93

# ----------------------------------------------------------------------------------------------
# Lexicon
# ----------------------------------------------------------------------------------------------

NOUNS = (
    "actor", "artist", "athlete", "author", "banker", "chef", "dancer", "doctor", "farmer", "judge",
    "lawyer", "manager", "nurse", "officer", "pilot", "president", "professor", "scientist",
    "secretary", "senator", "singer", "student", "teacher", "tourist",
)

# Synonym groups of (past, base) forms. Every transitive past form is also its past participle,
# so a passive premise contains all words of the active hypothesis (HANS le_passive / ln_passive).
TRANSITIVE = (
    (("helped", "help"), ("assisted", "assist"), ("aided", "aid")),
    (("called", "call"), ("phoned", "phone")),
    (("paid", "pay"),),
    (("thanked", "thank"),),
    (("avoided", "avoid"), ("evaded", "evade")),
    (("admired", "admire"), ("respected", "respect")),
    (("recognized", "recognize"), ("identified", "identify")),
    (("contacted", "contact"),),
    (("supported", "support"), ("backed", "back")),
    (("advised", "advise"), ("counseled", "counsel")),
    (("encouraged", "encourage"),),
    (("mentioned", "mention"),),
    (("introduced", "introduce"),),
    (("watched", "watch"), ("observed", "observe")),
    (("visited", "visit"),),
    (("followed", "follow"),),
    (("annoyed", "annoy"), ("bothered", "bother")),
    (("trusted", "trust"),),
    (("blamed", "blame"),),
    (("hired", "hire"), ("employed", "employ")),
)
INTRANSITIVE = (
    (("slept", "sleep"),),
    (("danced", "dance"),),
    (("waited", "wait"),),
    (("laughed", "laugh"), ("chuckled", "chuckle")),
    (("arrived", "arrive"), ("came", "come")),
    (("left", "leave"), ("departed", "depart")),
    (("ran", "run"),),
    (("shouted", "shout"), ("yelled", "yell")),
    (("smiled", "smile"), ("grinned", "grin")),
    (("resigned", "resign"), ("quit", "quit")),
    (("cried", "cry"), ("wept", "weep")),
    (("moved", "move"),),
    (("stopped", "stop"), ("paused", "pause")),
)
# Antonym pairs of adjective synonym groups.
ADJECTIVES = (
    (("tall",), ("short",)),
    (("happy", "glad"), ("sad", "unhappy")),
    (("old", "elderly"), ("young", "youthful")),
    (("rich", "wealthy"), ("poor",)),
    (("quiet", "silent"), ("loud", "noisy")),
    (("strong", "powerful"), ("weak", "feeble")),
    (("famous", "celebrated"), ("unknown", "obscure")),
    (("kind", "nice"), ("rude", "impolite")),
    (("smart", "clever"), ("foolish", "silly")),
    (("calm", "relaxed"), ("nervous", "anxious")),
)
PREPOSITIONS = ("near", "behind", "beside")
FACTIVE_THAT = ("knew", "realized", "noticed", "learned", "proved")  # 'X knew that A' entails A
NONFACTIVE_THAT = ("thought", "hoped", "believed", "claimed", "suspected")  # 'X thought that A' does not
NP_S_VERBS = (("knew", "know"), ("noticed", "notice"), ("forgot", "forget"), ("remembered", "remember"))
NP_Z_VERBS = (("left", "leave"), ("moved", "move"), ("stopped", "stop"))  # transitive or not
ADVERBS_ENTAILING = ("certainly", "clearly", "definitely", "obviously", "surely")
ADVERBS_NONENTAILING = ("probably", "maybe", "perhaps", "supposedly", "hopefully")
CONNECTIVES_ENTAILING = ("since", "because", "although", "after")
CONNECTIVES_NONENTAILING = ("if", "unless")
FUNCTION_WORDS = ("the", "who", "and", "or", "but", "did", "not", "was", "by", "that", "someone")
PUNCTUATION = (",", ".")
SOMEONE = "someone"


@dataclass(frozen=True)
class _Verb:
    past: str
    base: str
    transitive: bool


def _verb_index() -> Dict[str, Tuple[bool, int, int, int]]:
    """word -> (transitive, group, member, form) with form 0 = past, 1 = base."""
    index: Dict[str, Tuple[bool, int, int, int]] = {}
    for transitive, groups in ((True, TRANSITIVE), (False, INTRANSITIVE)):
        for g, group in enumerate(groups):
            for m, forms in enumerate(group):
                for f, word in enumerate(forms):
                    index.setdefault(word, (transitive, g, m, f))
    return index


def _adjective_index() -> Dict[str, Tuple[int, int, int]]:
    """word -> (antonym pair, side, member)."""
    return {w: (p, s, m) for p, pair in enumerate(ADJECTIVES) for s, side in enumerate(pair) for m, w in enumerate(side)}


_VERBS = _verb_index()
_ADJS = _adjective_index()
_NOUN_SET = frozenset(NOUNS)


def demo_vocabulary() -> List[str]:
    """Every word the grammar can produce (lower case, punctuation included), sorted."""
    words = set(NOUNS) | set(_VERBS) | set(_ADJS) | set(PREPOSITIONS) | set(FACTIVE_THAT) | set(NONFACTIVE_THAT)
    words |= {w for pair in NP_S_VERBS + NP_Z_VERBS for w in pair}
    words |= set(ADVERBS_ENTAILING + ADVERBS_NONENTAILING + CONNECTIVES_ENTAILING + CONNECTIVES_NONENTAILING)
    words |= set(FUNCTION_WORDS) | set(PUNCTUATION)
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# Phrases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NP:
    noun: str
    adj: Optional[str] = None
    tail: Tuple[str, ...] = ()  # post-modifier: ('near', 'the', 'actor') or ('who', 'danced')

    def words(self) -> Tuple[str, ...]:
        if self.noun == SOMEONE:
            return (SOMEONE,)
        return ("the",) + ((self.adj,) if self.adj else ()) + (self.noun,) + self.tail


@dataclass(frozen=True)
class _Clause:
    subj: _NP
    verb: _Verb
    obj: Optional[_NP] = None
    negated: bool = False
    passive: bool = False

    def words(self) -> Tuple[str, ...]:
        if self.passive:
            assert self.obj is not None
            neg = ("not",) if self.negated else ()
            return self.obj.words() + ("was",) + neg + (self.verb.past, "by") + self.subj.words()
        verb = ("did", "not", self.verb.base) if self.negated else (self.verb.past,)
        return self.subj.words() + verb + (self.obj.words() if self.obj else ())

    def nouns(self) -> Tuple[str, ...]:
        return tuple(np.noun for np in (self.subj, self.obj) if np is not None)


@dataclass(frozen=True)
class _Hyp:
    """A hypothesis a premise structure offers, with its gold label and HANS-style name."""

    clause: _Clause
    label: int
    heuristic: str  # a HANS heuristic, or 'none' for pairs outside the HANS templates
    subcase: str
    transformable: bool = True  # False where lexical edits could make it ungrammatical


@dataclass(frozen=True)
class _Premise:
    words: Tuple[str, ...]
    hyps: Tuple[_Hyp, ...]


class _Grammar:
    """Samples phrases; decoration rates differ between the natural splits and the challenge."""

    def __init__(self, rng: random.Random, adjective_rate: float, negation_rate: float, keep_adjective_rate: float):
        self.rng = rng
        self.adjective_rate = adjective_rate
        self.negation_rate = negation_rate
        self.keep_adjective_rate = keep_adjective_rate

    def nouns(self, k: int, exclude: Sequence[str] = ()) -> List[str]:
        pool = [n for n in NOUNS if n not in exclude]
        return self.rng.sample(pool, k)

    def np(self, noun: str, force_adjective: bool = False) -> _NP:
        if force_adjective or self.rng.random() < self.adjective_rate:
            side = self.rng.choice(self.rng.choice(ADJECTIVES))
            return _NP(noun, self.rng.choice(side))
        return _NP(noun)

    def hyp_np(self, np: _NP) -> _NP:
        """The premise NP as a hypothesis mentions it: no post-modifier, adjective maybe dropped."""
        keep = np.adj is not None and self.rng.random() < self.keep_adjective_rate
        return _NP(np.noun, np.adj if keep else None)

    def verb(self, transitive: bool, exclude_groups: Sequence[int] = ()) -> Tuple[_Verb, int]:
        groups = TRANSITIVE if transitive else INTRANSITIVE
        g = self.rng.choice([i for i in range(len(groups)) if i not in exclude_groups])
        past, base = self.rng.choice(groups[g])
        return _Verb(past, base, transitive), g

    def negated(self) -> bool:
        return self.rng.random() < self.negation_rate

    def simple_clause(self, exclude_nouns: Sequence[str] = ()) -> _Clause:
        transitive = self.rng.random() < 0.5
        nouns = self.nouns(2 if transitive else 1, exclude_nouns)
        verb, _ = self.verb(transitive)
        obj = self.np(nouns[1]) if transitive else None
        return _Clause(self.np(nouns[0]), verb, obj, negated=self.negated())

    def hyp_clause(self, clause: _Clause) -> _Clause:
        obj = self.hyp_np(clause.obj) if clause.obj else None
        return replace(clause, subj=self.hyp_np(clause.subj), obj=obj)


def _with_tail(np: _NP, tail: Tuple[str, ...]) -> _NP:
    return replace(np, tail=tail)


def _adjective_subcase(hyp: _Clause, premise_nps: Sequence[_NP], default: str) -> str:
    dropped = any(p.adj and not any(h.noun == p.noun and h.adj == p.adj for h in (hyp.subj, hyp.obj) if h) for p in premise_nps)
    return "se_adjective" if dropped else default


# ----------------------------------------------------------------------------------------------
# Premise structures. Each returns the premise words and the hypotheses it offers (all of whose
# words occur in the premise). Subcase names follow HANS (McCoy et al., 2019) where one fits.
# ----------------------------------------------------------------------------------------------

_E, _N = ENTAILMENT, NON_ENTAILMENT


def _simple(g: _Grammar, force_adjective: bool = False) -> _Premise:
    # the N1 V the N2
    n1, n2 = g.nouns(2)
    s, o = g.np(n1, force_adjective), g.np(n2)
    v, _ = g.verb(True)
    neg = g.negated()
    prem = _Clause(s, v, o, negated=neg)
    hs, ho = g.hyp_np(s), g.hyp_np(o)
    ent = _Clause(hs, v, ho, negated=neg)
    sub = _adjective_subcase(ent, (s, o), "identity")
    return _Premise(prem.words(), (
        _Hyp(ent, _E, "subsequence" if sub == "se_adjective" else "none", sub),
        _Hyp(_Clause(ho, v, hs, negated=neg), _N, "lexical_overlap", "ln_subject/object_swap"),
    ))


def _adjective(g: _Grammar) -> _Premise:
    # the ADJ N1 V the N2 -> the N1 V the N2
    n1, n2 = g.nouns(2)
    s, o = g.np(n1, force_adjective=True), g.np(n2)
    v, _ = g.verb(True)
    return _Premise(_Clause(s, v, o).words(), (_Hyp(_Clause(_NP(n1), v, _NP(n2)), _E, "subsequence", "se_adjective"),))


def _passive(g: _Grammar) -> _Premise:
    # the N1 was V by the N2
    n1, n2 = g.nouns(2)
    p1, p2 = g.np(n1), g.np(n2)
    v, _ = g.verb(True)
    prem = _Clause(p2, v, p1, passive=True)
    h1, h2 = g.hyp_np(p1), g.hyp_np(p2)
    return _Premise(prem.words(), (
        _Hyp(_Clause(h2, v, h1), _E, "lexical_overlap", "le_passive"),
        _Hyp(_Clause(h1, v, h2), _N, "lexical_overlap", "ln_passive"),
    ))


def _pp_on_subject_transitive(g: _Grammar) -> _Premise:
    # the N1 P the N2 V the N3
    n1, n2, n3 = g.nouns(3)
    p2 = g.np(n2)
    p1 = _with_tail(g.np(n1), (g.rng.choice(PREPOSITIONS),) + p2.words())
    p3 = g.np(n3)
    v, _ = g.verb(True)
    neg = g.negated()
    prem = _Clause(p1, v, p3, negated=neg)
    return _Premise(prem.words(), (
        _Hyp(_Clause(g.hyp_np(p1), v, g.hyp_np(p3), negated=neg), _E, "lexical_overlap", "le_around_prepositional_phrase"),
        _Hyp(_Clause(g.hyp_np(p3), v, g.hyp_np(p2), negated=neg), _N, "lexical_overlap", "ln_preposition"),
    ))


def _pp_on_subject_intransitive(g: _Grammar) -> _Premise:
    # the N1 P the N2 Vi
    n1, n2 = g.nouns(2)
    p2 = g.np(n2)
    p1 = _with_tail(g.np(n1), (g.rng.choice(PREPOSITIONS),) + p2.words())
    v, _ = g.verb(False)
    neg = g.negated()
    return _Premise(_Clause(p1, v, negated=neg).words(), (
        _Hyp(_Clause(g.hyp_np(p1), v, negated=neg), _E, "subsequence", "se_PP_on_subject"),
        _Hyp(_Clause(g.hyp_np(p2), v, negated=neg), _N, "subsequence", "sn_PP_on_subject"),
    ))


def _pp_on_object(g: _Grammar) -> _Premise:
    # the N1 V the N2 P the N3
    n1, n2, n3 = g.nouns(3)
    p1, p3 = g.np(n1), g.np(n3)
    p2 = _with_tail(g.np(n2), (g.rng.choice(PREPOSITIONS),) + p3.words())
    v, _ = g.verb(True)
    neg = g.negated()
    return _Premise(_Clause(p1, v, p2, negated=neg).words(), (
        _Hyp(_Clause(g.hyp_np(p1), v, g.hyp_np(p2), negated=neg), _E, "subsequence", "se_PP_on_obj"),
        _Hyp(_Clause(g.hyp_np(p1), v, g.hyp_np(p3), negated=neg), _N, "subsequence", "sn_PP_on_obj"),
    ))


def _relative_on_subject_transitive(g: _Grammar) -> _Premise:
    # the N1 who V1 the N2 V2 the N3
    n1, n2, n3 = g.nouns(3)
    p2, p3 = g.np(n2), g.np(n3)
    v1, g1 = g.verb(True)
    v2, _ = g.verb(True, exclude_groups=(g1,))
    p1 = _with_tail(g.np(n1), ("who", v1.past) + p2.words())
    h1, h2 = g.hyp_np(p1), g.hyp_np(p2)
    return _Premise(_Clause(p1, v2, p3).words(), (
        _Hyp(_Clause(h1, v2, g.hyp_np(p3)), _E, "lexical_overlap", "le_around_relative_clause"),
        _Hyp(_Clause(h1, v1, h2), _E, "lexical_overlap", "le_relative_clause"),
        _Hyp(_Clause(h2, v1, h1), _N, "lexical_overlap", "ln_relative_clause"),
    ))


def _relative_on_subject_intransitive(g: _Grammar) -> _Premise:
    # the N1 who V the N2 Vi
    n1, n2 = g.nouns(2)
    p2 = g.np(n2)
    v1, _ = g.verb(True)
    v2, _ = g.verb(False)
    p1 = _with_tail(g.np(n1), ("who", v1.past) + p2.words())
    return _Premise(_Clause(p1, v2).words(), (
        _Hyp(_Clause(g.hyp_np(p1), v2), _E, "subsequence", "se_relative_clause_on_subject"),
        _Hyp(_Clause(g.hyp_np(p2), v2), _N, "subsequence", "sn_relative_clause_on_subject"),
    ))


def _relative_on_object(g: _Grammar) -> _Premise:
    # the N1 V the N2 who Vi
    n1, n2 = g.nouns(2)
    p1 = g.np(n1)
    v1, _ = g.verb(True)
    v2, _ = g.verb(False)
    p2 = _with_tail(g.np(n2), ("who", v2.past))
    return _Premise(_Clause(p1, v1, p2).words(), (
        _Hyp(_Clause(g.hyp_np(p1), v1, g.hyp_np(p2)), _E, "subsequence", "se_relative_clause_on_obj"),
        _Hyp(_Clause(g.hyp_np(p1), v2), _N, "subsequence", "sn_relative_clause_on_obj"),
    ))


def _conjoined_subject_transitive(g: _Grammar) -> _Premise:
    # the N1 and the N2 V the N3
    n1, n2, n3 = g.nouns(3)
    p1, p2, p3 = g.np(n1), g.np(n2), g.np(n3)
    v, _ = g.verb(True)
    words = p1.words() + ("and",) + p2.words() + (v.past,) + p3.words()
    pick = g.rng.choice((p1, p2))
    return _Premise(words, (
        _Hyp(_Clause(g.hyp_np(pick), v, g.hyp_np(p3)), _E, "lexical_overlap", "le_conjunction"),
        _Hyp(_Clause(g.hyp_np(p3), v, g.hyp_np(pick)), _N, "lexical_overlap", "ln_conjunction"),
    ))


def _conjoined_subject_intransitive(g: _Grammar) -> _Premise:
    # the N1 and the N2 Vi
    n1, n2 = g.nouns(2)
    p1, p2 = g.np(n1), g.np(n2)
    v, _ = g.verb(False)
    words = p1.words() + ("and",) + p2.words() + (v.past,)
    return _Premise(words, (_Hyp(_Clause(g.hyp_np(g.rng.choice((p1, p2))), v), _E, "subsequence", "se_conjunction"),))


def _np_s(g: _Grammar) -> _Premise:
    # the N1 knew the N2 V the N3  (NP/S garden path: N2 is the embedded subject, not the object)
    n1, n2, n3 = g.nouns(3)
    p1, p2, p3 = g.np(n1), g.np(n2), g.np(n3)
    past, base = g.rng.choice(NP_S_VERBS)
    v, _ = g.verb(True)
    words = p1.words() + (past,) + _Clause(p2, v, p3).words()
    return _Premise(words, (
        _Hyp(_Clause(g.hyp_np(p2), v, g.hyp_np(p3)), _E, "subsequence", "se_NP/S"),
        _Hyp(_Clause(g.hyp_np(p1), _Verb(past, base, True), g.hyp_np(p2)), _N, "subsequence", "sn_NP/S", transformable=False),
    ))


def _np_z(g: _Grammar) -> _Premise:
    # since the N1 left the N2 V the N3  (NP/Z garden path: 'left' has no object)
    n1, n2, n3 = g.nouns(3)
    p1, p2, p3 = g.np(n1), g.np(n2), g.np(n3)
    past, base = g.rng.choice(NP_Z_VERBS)
    v, _ = g.verb(True)
    words = (g.rng.choice(CONNECTIVES_ENTAILING),) + p1.words() + (past,) + _Clause(p2, v, p3).words()
    return _Premise(words, (
        _Hyp(_Clause(g.hyp_np(p2), v, g.hyp_np(p3)), _E, "subsequence", "se_NP/Z"),
        _Hyp(_Clause(g.hyp_np(p1), _Verb(past, base, True), g.hyp_np(p2)), _N, "subsequence", "sn_NP/Z", transformable=False),
    ))


def _two_clauses(g: _Grammar) -> Tuple[_Clause, _Clause]:
    a = g.simple_clause()
    b = g.simple_clause(exclude_nouns=a.nouns())
    return a, b


def _subordinate(g: _Grammar, entailing: bool) -> _Premise:
    # since A , B   /   if A , B
    a, b = _two_clauses(g)
    conn = g.rng.choice(CONNECTIVES_ENTAILING if entailing else CONNECTIVES_NONENTAILING)
    words = (conn,) + a.words() + (",",) + b.words()
    if entailing:
        hyps = (_Hyp(g.hyp_clause(a), _E, "constituent", "ce_embedded_under_since"),
                _Hyp(g.hyp_clause(b), _E, "constituent", "ce_after_since_clause"))
    else:
        hyps = (_Hyp(g.hyp_clause(a), _N, "constituent", "cn_embedded_under_if"),
                _Hyp(g.hyp_clause(b), _N, "constituent", "cn_after_if_clause"))
    return _Premise(words, hyps)


def _coordinate(g: _Grammar, entailing: bool) -> _Premise:
    # A , and B   /   A , or B
    a, b = _two_clauses(g)
    conj = g.rng.choice(("and", "but")) if entailing else "or"
    words = a.words() + (",", conj) + b.words()
    pick = g.hyp_clause(g.rng.choice((a, b)))
    hyp = _Hyp(pick, _E, "constituent", "ce_conjunction") if entailing else _Hyp(pick, _N, "constituent", "cn_disjunction")
    return _Premise(words, (hyp,))


def _adverb(g: _Grammar, entailing: bool) -> _Premise:
    # certainly A   /   probably A
    a = g.simple_clause()
    adv = g.rng.choice(ADVERBS_ENTAILING if entailing else ADVERBS_NONENTAILING)
    hyp = _Hyp(g.hyp_clause(a), _E, "constituent", "ce_adverb") if entailing else _Hyp(g.hyp_clause(a), _N, "constituent", "cn_adverb")
    return _Premise((adv,) + a.words(), (hyp,))


def _embedded_under_verb(g: _Grammar, entailing: bool) -> _Premise:
    # the N0 knew that A   /   the N0 thought that A
    a = g.simple_clause()
    n0 = g.nouns(1, exclude=a.nouns())[0]
    verb = g.rng.choice(FACTIVE_THAT if entailing else NONFACTIVE_THAT)
    words = g.np(n0).words() + (verb, "that") + a.words()
    label = _E if entailing else _N
    return _Premise(words, (_Hyp(g.hyp_clause(a), label, "constituent", "ce_embedded_under_verb" if entailing else "cn_embedded_under_verb"),))


_STRUCTURES: Dict[str, Callable[[_Grammar], _Premise]] = {
    "simple": _simple,
    "passive": _passive,
    "pp_on_subject_transitive": _pp_on_subject_transitive,
    "pp_on_subject_intransitive": _pp_on_subject_intransitive,
    "pp_on_object": _pp_on_object,
    "relative_on_subject_transitive": _relative_on_subject_transitive,
    "relative_on_subject_intransitive": _relative_on_subject_intransitive,
    "relative_on_object": _relative_on_object,
    "conjoined_subject_transitive": _conjoined_subject_transitive,
    "conjoined_subject_intransitive": _conjoined_subject_intransitive,
    "np_s": _np_s,
    "np_z": _np_z,
    "since": lambda g: _subordinate(g, True),
    "if": lambda g: _subordinate(g, False),
    "and": lambda g: _coordinate(g, True),
    "or": lambda g: _coordinate(g, False),
    "certainly": lambda g: _adverb(g, True),
    "probably": lambda g: _adverb(g, False),
    "knew_that": lambda g: _embedded_under_verb(g, True),
    "thought_that": lambda g: _embedded_under_verb(g, False),
}

# How often each premise structure is drawn for train/dev. Constructions whose clauses are not
# asserted (if, or, probably, thought that) are rarer, as in MNLI; with equal weight a model learns
# "these words mean non-entailment" and the constituent heuristic no longer shows.
_STRUCTURE_WEIGHTS = {name: (0.35 if name in ("if", "or", "probably", "thought_that") else 1.0) for name in _STRUCTURES}

# Challenge subcases: (heuristic, label) -> [(subcase, structure)]; the structure offers that subcase.
_CHALLENGE: Dict[Tuple[str, int], List[Tuple[str, Callable[[_Grammar], _Premise]]]] = {
    ("lexical_overlap", _E): [
        ("le_passive", _passive), ("le_around_prepositional_phrase", _pp_on_subject_transitive),
        ("le_around_relative_clause", _relative_on_subject_transitive),
        ("le_relative_clause", _relative_on_subject_transitive), ("le_conjunction", _conjoined_subject_transitive),
    ],
    ("lexical_overlap", _N): [
        ("ln_subject/object_swap", _simple), ("ln_passive", _passive), ("ln_preposition", _pp_on_subject_transitive),
        ("ln_relative_clause", _relative_on_subject_transitive), ("ln_conjunction", _conjoined_subject_transitive),
    ],
    ("subsequence", _E): [
        ("se_adjective", _adjective), ("se_PP_on_subject", _pp_on_subject_intransitive), ("se_PP_on_obj", _pp_on_object),
        ("se_relative_clause_on_obj", _relative_on_object), ("se_conjunction", _conjoined_subject_intransitive),
    ],
    ("subsequence", _N): [
        ("sn_PP_on_subject", _pp_on_subject_intransitive), ("sn_relative_clause_on_subject", _relative_on_subject_intransitive),
        ("sn_PP_on_obj", _pp_on_object), ("sn_NP/S", _np_s), ("sn_NP/Z", _np_z),
    ],
    ("constituent", _E): [
        ("ce_embedded_under_since", _STRUCTURES["since"]), ("ce_after_since_clause", _STRUCTURES["since"]),
        ("ce_conjunction", _STRUCTURES["and"]), ("ce_adverb", _STRUCTURES["certainly"]),
        ("ce_embedded_under_verb", _STRUCTURES["knew_that"]),
    ],
    ("constituent", _N): [
        ("cn_embedded_under_if", _STRUCTURES["if"]), ("cn_after_if_clause", _STRUCTURES["if"]),
        ("cn_disjunction", _STRUCTURES["or"]), ("cn_adverb", _STRUCTURES["probably"]),
        ("cn_embedded_under_verb", _STRUCTURES["thought_that"]),
    ],
}

# ----------------------------------------------------------------------------------------------
# Lexical edits that move a hypothesis away from its premise (lower overlap).
# Each returns the edited words or None when it does not apply.
# ----------------------------------------------------------------------------------------------

Words = Tuple[str, ...]


def _verb_at(words: Words, i: int) -> Tuple[bool, int, int, int]:
    """(transitive, group, member, form) of the verb words[i]; the form comes from the context
    because a few verbs spell past and base alike ('quit')."""
    transitive, g, m, _ = _VERBS[words[i]]
    return transitive, g, m, 1 if words[max(0, i - 2) : i] == ("did", "not") else 0


def _edit_synonym(rng: random.Random, hyp: Words, premise: Words) -> Optional[Words]:
    spots = []
    for i, w in enumerate(hyp):
        if w in _VERBS:
            transitive, g, m, f = _verb_at(hyp, i)
            group = (TRANSITIVE if transitive else INTRANSITIVE)[g]
            spots += [(i, forms[f]) for mm, forms in enumerate(group) if mm != m and forms[f] != w]
        elif w in _ADJS:
            p, s, m = _ADJS[w]
            spots += [(i, other) for other in ADJECTIVES[p][s] if other != w]
    if not spots:
        return None
    i, new = rng.choice(spots)
    return hyp[:i] + (new,) + hyp[i + 1 :]


def _edit_other_verb(rng: random.Random, hyp: Words, premise: Words) -> Optional[Words]:
    spots = [i for i, w in enumerate(hyp) if w in _VERBS]
    if not spots:
        return None
    i = rng.choice(spots)
    transitive, g, _, f = _verb_at(hyp, i)
    groups = TRANSITIVE if transitive else INTRANSITIVE
    used = set(premise) | set(hyp)
    # Another meaning: a group none of whose forms occurs in the premise.
    free = [k for k, group in enumerate(groups) if k != g and not any(w in used for forms in group for w in forms)]
    if not free:
        return None
    forms = rng.choice(groups[rng.choice(free)])
    return hyp[:i] + (forms[f],) + hyp[i + 1 :]


def _edit_other_noun(rng: random.Random, hyp: Words, premise: Words) -> Optional[Words]:
    spots = [i for i, w in enumerate(hyp) if w in _NOUN_SET]
    if not spots:
        return None
    i = rng.choice(spots)
    used = set(premise) | set(hyp)
    return hyp[:i] + (rng.choice([n for n in NOUNS if n not in used]),) + hyp[i + 1 :]


def _edit_antonym(rng: random.Random, hyp: Words, premise: Words) -> Optional[Words]:
    spots = [i for i, w in enumerate(hyp) if w in _ADJS]
    if not spots:
        return None
    i = rng.choice(spots)
    p, s, _ = _ADJS[hyp[i]]
    return hyp[:i] + (rng.choice(ADJECTIVES[p][1 - s]),) + hyp[i + 1 :]


def _toggle_negation(clause: _Clause) -> _Clause:
    return replace(clause, negated=not clause.negated)


def _toggle_passive(clause: _Clause) -> Optional[_Clause]:
    if clause.obj is None or not clause.verb.transitive:
        return None
    return replace(clause, passive=not clause.passive)


def _hypernym(rng: random.Random, clause: _Clause) -> Optional[_Clause]:
    """Replace an argument by 'someone' (entailed: upward monotone; not the object under negation)."""
    slots = ["subj"] if clause.subj.noun != SOMEONE else []
    if clause.obj is not None and not clause.negated and clause.obj.noun != SOMEONE:
        slots.append("obj")
    if not slots:
        return None
    return replace(clause, **{rng.choice(slots): _NP(SOMEONE)})


# (edit, weight, keeps the label): label-keeping edits of an entailed hypothesis stay entailed;
# every other edit makes it non-entailment (a non-entailment stays non-entailment under all of them).
_EDITS = (
    ("negation", 0.20, False),
    ("other_noun", 0.24, False),
    ("other_verb", 0.17, False),
    ("antonym", 0.06, False),
    ("unrelated", 0.13, False),
    ("synonym", 0.03, True),
    ("passive", 0.07, True),
    ("hypernym", 0.08, True),
)


# ----------------------------------------------------------------------------------------------
# Split generation
# ----------------------------------------------------------------------------------------------

# Fraction of natural (train/dev) pairs that keep every hypothesis word in the premise.
_HIGH_OVERLAP_RATE = 0.45


@dataclass
class _Pair:
    premise: Words
    hypothesis: Words
    label: int
    heuristic: str
    subcase: str


def _natural_pair(g: _Grammar, shortcut: float) -> _Pair:
    rng = g.rng
    names, weights = list(_STRUCTURE_WEIGHTS), list(_STRUCTURE_WEIGHTS.values())

    def premise() -> _Premise:
        return _STRUCTURES[rng.choices(names, weights)[0]](g)

    if rng.random() < _HIGH_OVERLAP_RATE:
        want = _E if rng.random() < shortcut else _N
        while True:
            prem = premise()
            options = [h for h in prem.hyps if h.label == want]
            if want == _E and rng.random() < 0.25:
                whole = _drop_adjectives(rng, prem.words)
                if whole is not None:
                    return _Pair(prem.words, whole, _E, "none", "drop_adjectives")
            if options:
                h = rng.choice(options)
                return _Pair(prem.words, h.clause.words(), h.label, h.heuristic, h.subcase)
    while True:
        pair = _edited_pair(g, premise())
        if pair is not None:
            return pair


def _drop_adjectives(rng: random.Random, words: Words) -> Optional[Words]:
    spots = [i for i, w in enumerate(words) if w in _ADJS]
    if not spots:
        return None
    drop = set(rng.sample(spots, rng.randint(1, len(spots))))
    return tuple(w for i, w in enumerate(words) if i not in drop)


def _edited_pair(g: _Grammar, prem: _Premise) -> Optional[_Pair]:
    rng = g.rng
    ents = [h for h in prem.hyps if h.label == _E]
    nons = [h for h in prem.hyps if h.label == _N and h.transformable]
    roll = rng.random()
    if roll < 0.65 and ents:
        source: Optional[_Hyp] = rng.choice(ents)
    elif roll < 0.85 and nons:
        source = rng.choice(nons)
    else:
        source = None  # edit the whole premise
    names, weights = [e[0] for e in _EDITS], [e[1] for e in _EDITS]
    edit = rng.choices(names, weights)[0]
    label = source.label if source is not None else _E
    keeps = dict((e[0], e[2]) for e in _EDITS)[edit]
    if edit == "unrelated":
        clause = g.simple_clause(exclude_nouns=[w for w in prem.words if w in _NOUN_SET])
        hyp: Optional[Words] = g.hyp_clause(clause).words()
    elif edit in ("negation", "passive", "hypernym"):
        if source is None or not source.transformable:
            return None
        if edit == "hypernym" and label != _E:
            return None  # 'someone' can turn a non-entailment into an entailment
        new = {"negation": _toggle_negation, "passive": _toggle_passive,
               "hypernym": lambda c: _hypernym(rng, c)}[edit](source.clause)
        hyp = new.words() if new is not None else None
    else:
        base = source.clause.words() if source is not None else (_drop_adjectives(rng, prem.words) or prem.words)
        fn = {"synonym": _edit_synonym, "other_verb": _edit_other_verb, "other_noun": _edit_other_noun, "antonym": _edit_antonym}[edit]
        hyp = fn(rng, base, prem.words)
    if hyp is None:
        return None
    subcase = edit
    if rng.random() < 0.08 and edit != "synonym":
        more = _edit_synonym(rng, hyp, prem.words)
        if more is not None:
            hyp, subcase = more, edit + "+synonym"
    return _Pair(prem.words, hyp, label if keeps else _N, "none", subcase)


def _challenge_pair(g: _Grammar, heuristic: str, label: int) -> _Pair:
    subcase, structure = g.rng.choice(_CHALLENGE[(heuristic, label)])
    prem = structure(g)
    (hyp,) = [h for h in prem.hyps if h.subcase == subcase]
    return _Pair(prem.words, hyp.clause.words(), hyp.label, heuristic, subcase)


def _sentence(words: Words) -> str:
    text = " ".join(words).replace(" ,", ",")
    return text[0].upper() + text[1:] + "."


def word_overlap(premise: str, hypothesis: str) -> float:
    """Fraction of the hypothesis's words (lower case, punctuation ignored) found in the premise."""
    p = set(_words(premise))
    h = _words(hypothesis)
    return sum(w in p for w in h) / len(h) if h else 0.0


def _words(text: str) -> List[str]:
    return text.lower().replace(",", " ").replace(".", " ").split()


def generate_split(split: str, size: int, seed: int = 0, shortcut: float = DEFAULT_SHORTCUT) -> pd.DataFrame:
    """One demo split as a DataFrame with columns id, premise, hypothesis, label, label_name,
    heuristic, subcase, overlap.

    split: 'train' or 'dev' (the natural distribution with the overlap shortcut) or 'challenge'
    (HANS-shaped: full overlap, half non-entailment, balanced over heuristics). The three splits
    draw from independent random streams of ``seed``.
    shortcut: fraction of full-overlap train/dev pairs that are entailment.
    """
    if split not in SPLITS:
        raise ConfigError(f"Unknown demo split '{split}'. Fix: use one of {', '.join(SPLITS)}.")
    if size < 1:
        raise ConfigError(f"Demo split size must be >= 1, got {size}. Fix: raise data.demo_train_size / data.demo_eval_size.")
    if not 0.0 <= shortcut <= 1.0:
        raise ConfigError(f"Demo shortcut strength must be in [0, 1], got {shortcut}. Fix: e.g. data.demo_shortcut=0.93.")
    rng = random.Random(f"fastif-demo:{seed}:{split}")  # str seeds hash with sha512: stable everywhere
    pairs: List[_Pair] = []
    if split == "challenge":
        g = _Grammar(rng, adjective_rate=0.0, negation_rate=0.0, keep_adjective_rate=0.0)
        cells = [(h, lab) for h in HEURISTICS for lab in (_E, _N)]
        for i in range(size):
            heuristic, label = cells[i % len(cells)]
            pairs.append(_challenge_pair(g, heuristic, label))
        order = list(range(size))
        rng.shuffle(order)
        pairs = [pairs[i] for i in order]
    else:
        g = _Grammar(rng, adjective_rate=0.25, negation_rate=0.15, keep_adjective_rate=0.5)
        pairs = [_natural_pair(g, shortcut) for _ in range(size)]
    rows = []
    for i, p in enumerate(pairs):
        premise, hypothesis = _sentence(p.premise), _sentence(p.hypothesis)
        rows.append((f"demo-{split}-{i:06d}", premise, hypothesis, p.label, LABEL_NAMES[p.label],
                     p.heuristic, p.subcase, word_overlap(premise, hypothesis)))
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["label"] = df["label"].astype("int64")
    return df


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def demo_tokenizer():
    """A BERT-style word-level fast tokenizer over the grammar's vocabulary.

    Lower-cases, splits on whitespace and punctuation, maps each word to one id ([UNK] for words
    outside the grammar), and builds ``[CLS] premise [SEP] hypothesis [SEP]`` with token_type_ids
    0/1. It is a ``transformers`` PreTrainedTokenizerFast, so ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained`` round-trip it with the model.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + demo_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
