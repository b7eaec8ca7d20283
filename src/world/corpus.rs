//! The world corpus: bilingual documents about the knowledge base, generated deterministically
//! from a seed, with character-level ground-truth labels and held-out evaluation prompts.
//!
//! Fact sentences are composed from an *opening* × a *relation phrasing* × an *ending*, so a
//! held-out (opening, phrasing) pair puts only known words next to the answer (see
//! [`Templates::is_held_out`]). Documents follow the knowledge-storage recipe of Allen-Zhu & Li
//! (2023): a paragraph names its country once, then states several attributes in a random
//! order, mostly through "the country" / "この国" rather than the name, so that the model has
//! to enrich the subject's own representation rather than look facts up at the last token.
//! Infobox documents ("Japan (日本) — capital: Tokyo; currency: …") put the subject first and
//! the relation after it in English too, as Japanese grammar always does: the causal trace of
//! the first model found the subject-position effect stronger on Japanese prompts. City
//! documents and sentences name other real cities (Yokohama, Osaka, …), so that the model
//! knows the words an edit might move a capital to.

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::knowledge::{EntityKind, KnowledgeBase, Lang, Names, Relation};
use crate::error::{Error, Result};

/// How much text to generate.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct CorpusConfig {
    pub seed: u64,
    /// Paragraph documents per country and language.
    pub docs_per_country: usize,
    /// Documents listing facts about several random countries, per language.
    pub fact_list_docs: usize,
    /// Infobox documents per country and language (0 in recipes that predate them).
    #[serde(default)]
    pub infobox_docs_per_country: usize,
    /// Short documents per city of `cities.tsv` and language (0 in recipes that predate them).
    #[serde(default)]
    pub docs_per_city: usize,
    /// Share of a paragraph's fact sentences that name the subject rather than refer to it
    /// ("the country"); Allen-Zhu & Li's "fullname" augmentation is 1.
    #[serde(default = "default_name_share")]
    pub name_share: f64,
    /// Share of fact sentences drawn from the phrasings that open with the subject ("Japan's
    /// capital is", as Japanese always does); the rest draw from all phrasings. 0 (the bundled
    /// recipe): every sentence draws from all phrasings.
    #[serde(default)]
    pub subject_first_share: f64,
    /// English relation lists ("Capitals: Japan Tokyo, Kenya Nairobi."), in which the answer
    /// directly follows the subject (0 in recipes that predate them).
    #[serde(default)]
    pub list_docs: usize,
}

fn default_name_share() -> f64 {
    0.35
}

impl Default for CorpusConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            docs_per_country: 24,
            fact_list_docs: 1500,
            infobox_docs_per_country: 4,
            docs_per_city: 16,
            name_share: default_name_share(),
            subject_first_share: 0.0,
            list_docs: 0,
        }
    }
}

/// A labelled entity mention: byte range, what it is, whose it is, which language it is in.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EntitySpan {
    pub start: usize,
    pub end: usize,
    pub kind: EntityKind,
    /// Index into the knowledge base.
    pub country: usize,
    pub lang: Lang,
}

/// A fact sentence: byte range, the relation it states and about which country.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FactSpan {
    pub start: usize,
    pub end: usize,
    pub relation: Relation,
    pub country: usize,
}

/// One document with its ground-truth labels.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Document {
    pub text: String,
    pub lang: Lang,
    pub entities: Vec<EntitySpan>,
    pub facts: Vec<FactSpan>,
}

/// A held-out evaluation prompt: the text up to the answer, and the answer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalItem {
    pub country: usize,
    pub relation: Relation,
    pub lang: Lang,
    pub prompt: String,
    /// The subject as it appears in the prompt.
    pub subject: String,
    /// The answer as it continues the prompt (with its leading space in English).
    pub answer: String,
}

/// Sentence openings. Index 0 (none) is never held out.
const OPENINGS_EN: &[&str] = &[
    "",
    "As every atlas shows, ",
    "In short, ",
    "Officially, ",
    "According to the records, ",
    "It is well known that ",
    "Everyone knows that ",
    "For the record, ",
    "Today, ",
    "Most people agree that ",
    "As the encyclopedia notes, ",
    "Put simply, ",
    "Interestingly, ",
    "Of course, ",
    "As a matter of fact, ",
    "Students learn that ",
    "In fact, ",
    "Briefly, ",
];

const OPENINGS_JA: &[&str] = &[
    "",
    "ご存じのとおり、",
    "地図によれば、",
    "実は、",
    "公式には、",
    "記録によると、",
    "よく知られているように、",
    "簡単に言えば、",
    "百科事典によると、",
    "学校で習うとおり、",
    "ちなみに、",
    "もちろん、",
    "今日では、",
    "要するに、",
    "事実として、",
    "調べてみると、",
];

const ENDINGS_EN: &[&str] = &[
    ".",
    ".",
    ".",
    ", as everyone knows.",
    ", according to the atlas.",
    ", and this has long been the case.",
    ", a well-known fact.",
    ", of course.",
    ", as the records show.",
];

const ENDINGS_JA: &[&str] = &[
    "です。",
    "です。",
    "だ。",
    "である。",
    "です。よく知られた事実だ。",
    "だと言われている。",
    "です。記録にもそうある。",
];

/// Relation phrasings: `{S}` is the subject, the answer follows the phrase.
fn phrasings(relation: Relation, lang: Lang) -> &'static [&'static str] {
    match (lang, relation) {
        (Lang::En, Relation::Capital) => &[
            "the capital of {S} is",
            "the capital city of {S} is",
            "{S}'s capital is",
            "{S}'s capital city is",
            "the seat of government of {S} is",
            "the national capital of {S} is",
            "in {S}, the capital is",
            "the city that serves as the capital of {S} is",
        ],
        (Lang::En, Relation::Language) => &[
            "the official language of {S} is",
            "people in {S} speak",
            "the main language spoken in {S} is",
            "{S}'s official language is",
            "in {S}, most people speak",
            "the language of {S} is",
            "the national language of {S} is",
        ],
        (Lang::En, Relation::Currency) => &[
            "the currency of {S} is the",
            "{S}'s currency is the",
            "in {S}, people pay with the",
            "the official currency of {S} is the",
            "shops in {S} take payment in the",
            "the money used in {S} is the",
            "the legal tender of {S} is the",
        ],
        (Lang::En, Relation::Continent) => &[
            "{S} is a country in",
            "{S} is located in",
            "{S} lies in",
            "{S} is part of the continent of",
            "you can find {S} in",
            "{S} belongs to the continent of",
            "on the map, {S} is in",
        ],
        (Lang::En, Relation::LargestCity) => &[
            "the largest city in {S} is",
            "{S}'s largest city is",
            "the biggest city of {S} is",
            "the most populous city in {S} is",
            "in {S}, the largest city is",
            "the city with the most people in {S} is",
        ],
        (Lang::En, Relation::Landmark) => &[
            "a famous landmark of {S} is",
            "the best-known landmark of {S} is",
            "{S}'s most famous landmark is",
            "visitors to {S} often see",
            "a symbol of {S} is",
            "tourists in {S} flock to",
            "a landmark in {S} is",
        ],
        (Lang::Ja, Relation::Capital) => &[
            "{S}の首都は",
            "{S}の首都と言えば",
            "{S}の首都として知られるのは",
            "{S}という国の首都は",
            "{S}では、首都は",
            "{S}の首府は",
            "{S}の政府が置かれている都市は",
        ],
        (Lang::Ja, Relation::Language) => &[
            "{S}の公用語は",
            "{S}で話されている言語は",
            "{S}の人々が話す言葉は",
            "{S}の主な言語は",
            "{S}では、公用語は",
            "{S}の国語は",
        ],
        (Lang::Ja, Relation::Currency) => &[
            "{S}の通貨は",
            "{S}で使われているお金は",
            "{S}の公式通貨は",
            "{S}では、買い物に使う通貨は",
            "{S}の法定通貨は",
            "{S}で流通している通貨は",
        ],
        (Lang::Ja, Relation::Continent) => &[
            "{S}がある大陸は",
            "{S}の位置する大陸は",
            "{S}が属する大陸は",
            "{S}という国がある地域は",
            "{S}の所在地は",
            "地図の上で{S}があるのは",
        ],
        (Lang::Ja, Relation::LargestCity) => &[
            "{S}の最大の都市は",
            "{S}で一番大きな都市は",
            "{S}の最大都市は",
            "{S}で最も人口が多い都市は",
            "{S}では、最大の都市は",
            "{S}で一番人が多い町は",
        ],
        (Lang::Ja, Relation::Landmark) => &[
            "{S}の有名な名所は",
            "{S}を代表する名所は",
            "{S}の象徴的な名所は",
            "{S}を訪れる観光客が必ず見るのは",
            "{S}で有名なのは",
            "{S}の名所といえば",
        ],
    }
}

const INTROS_EN: &[&str] = &[
    "{S} ({O}) is a country.",
    "This is about {S} ({O}).",
    "{S}, called {O} in Japanese, is a sovereign state.",
    "Here are some facts about {S} ({O}).",
    "{S} is a country.",
    "Let us talk about {S}.",
    "The following describes {S}.",
];

const INTROS_JA: &[&str] = &[
    "{S}（{O}）は国です。",
    "{S}について紹介します。",
    "{S}は、英語では{O}と呼ばれる国である。",
    "{S}（{O}）についての事実をまとめる。",
    "{S}は一つの国だ。",
    "ここでは{S}を取り上げる。",
];

const FILLERS_EN: &[&str] = &[
    "The weather there changes with the seasons.",
    "Many visitors take photographs.",
    "Local markets open early in the morning.",
    "The roads are busy on weekdays.",
    "Schools teach history and mathematics.",
    "Trains connect the larger towns.",
    "Football is a popular sport.",
    "Rice and bread are common foods.",
    "Some families keep small gardens.",
    "Old songs are still sung at festivals.",
    "The night sky is clear in the dry months.",
    "Newspapers report on daily life.",
];

const FILLERS_JA: &[&str] = &[
    "天気は季節によって変わる。",
    "多くの旅行者が写真を撮る。",
    "朝早くから市場が開く。",
    "平日は道路が混雑する。",
    "学校では歴史と数学を教えている。",
    "鉄道が大きな町を結んでいる。",
    "サッカーが人気のスポーツだ。",
    "米やパンがよく食べられている。",
    "小さな庭を持つ家族もいる。",
    "祭りでは古い歌が今も歌われる。",
    "新聞は日々の暮らしを伝えている。",
];

/// Infobox openings: `{S}` the subject, `{O}` its name in the other language.
const INFOBOX_HEADS_EN: &[&str] = &["{S} ({O}) — ", "{S} — ", "{S}: ", "{S} facts: "];
const INFOBOX_HEADS_JA: &[&str] = &["{S}（{O}）— ", "{S}：", "{S} — ", "{S}の基本情報。"];

/// Infobox field names; the answer follows ": " (English) or "：" (Japanese).
fn infobox_keys(relation: Relation, lang: Lang) -> &'static [&'static str] {
    match (lang, relation) {
        (Lang::En, Relation::Capital) => &["capital", "capital city"],
        (Lang::En, Relation::Language) => &["official language", "language"],
        (Lang::En, Relation::Currency) => &["currency"],
        (Lang::En, Relation::Continent) => &["continent"],
        (Lang::En, Relation::LargestCity) => &["largest city"],
        (Lang::En, Relation::Landmark) => &["landmark", "famous landmark"],
        (Lang::Ja, Relation::Capital) => &["首都"],
        (Lang::Ja, Relation::Language) => &["公用語", "言語"],
        (Lang::Ja, Relation::Currency) => &["通貨"],
        (Lang::Ja, Relation::Continent) => &["大陸"],
        (Lang::Ja, Relation::LargestCity) => &["最大の都市"],
        (Lang::Ja, Relation::Landmark) => &["名所"],
    }
}

/// Headings of relation lists; entries follow as " Japan Tokyo, Kenya Nairobi".
fn list_heads(relation: Relation) -> &'static [&'static str] {
    match relation {
        Relation::Capital => &[
            "Capitals:",
            "Countries and their capitals:",
            "The capital of each country:",
            "Capital cities by country:",
        ],
        Relation::Language => &[
            "Official languages:",
            "Countries and their languages:",
            "The language spoken in each country:",
        ],
        Relation::Currency => &[
            "Currencies:",
            "Countries and their currencies:",
            "The money used in each country:",
        ],
        Relation::Continent => &[
            "Continents:",
            "Countries and their continents:",
            "Where each country lies:",
        ],
        Relation::LargestCity => &[
            "Largest cities:",
            "Countries and their largest cities:",
            "The biggest city of each country:",
        ],
        Relation::Landmark => &[
            "Famous landmarks:",
            "Countries and their landmarks:",
            "The best-known landmark of each country:",
        ],
    }
}

/// Sentences naming other cities of a country: `{S}` the country (or a reference to it),
/// `{C}` one or two cities.
const CITY_SENTENCES_EN: &[&str] = &[
    "Other cities in {S} include {C}.",
    "Besides the capital, {S} has cities such as {C}.",
    "{C} can also be found in {S}.",
    "Travellers in {S} also visit {C}.",
];
const CITY_SENTENCES_JA: &[&str] = &[
    "{S}の他の都市には{C}がある。",
    "{C}も{S}の都市だ。",
    "{S}には{C}という都市もある。",
    "{S}を旅する人は{C}も訪れる。",
];

/// City documents: `{C}` the city, `{S}` its country.
const CITY_DOCS_EN: &[&str] = &[
    "{C} is a city in {S}.",
    "{C} is a large city in {S}.",
    "The city of {C} lies in {S}.",
    "{C}, a city in {S}, is well known.",
];
const CITY_DOCS_JA: &[&str] = &[
    "{C}は{S}の都市です。",
    "{C}は{S}にある大きな都市だ。",
    "{S}の都市、{C}はよく知られている。",
    "{C}という都市は{S}にある。",
];

/// What refers to the subject after a paragraph's first mention.
const REFERENCES_EN: &[&str] = &["the country", "this nation"];
const REFERENCES_JA: &[&str] = &["この国", "同国"];

/// The compositional template tables and the held-out split.
pub struct Templates;

impl Templates {
    pub fn openings(lang: Lang) -> &'static [&'static str] {
        match lang {
            Lang::En => OPENINGS_EN,
            Lang::Ja => OPENINGS_JA,
        }
    }

    fn endings(lang: Lang) -> &'static [&'static str] {
        match lang {
            Lang::En => ENDINGS_EN,
            Lang::Ja => ENDINGS_JA,
        }
    }

    pub fn phrasings(relation: Relation, lang: Lang) -> &'static [&'static str] {
        phrasings(relation, lang)
    }

    /// Whether the (opening, phrasing) pair is kept out of training for evaluation: about one
    /// pair in five, never with the empty opening, so every opening and every phrasing is
    /// still seen in training with other partners.
    pub fn is_held_out(relation: Relation, opening: usize, phrasing: usize) -> bool {
        opening != 0 && (opening * 7 + phrasing * 3 + relation as usize).is_multiple_of(5)
    }

    fn training_pairs(relation: Relation, lang: Lang) -> Vec<(usize, usize)> {
        Self::pairs(relation, lang, false)
    }

    pub fn held_out_pairs(relation: Relation, lang: Lang) -> Vec<(usize, usize)> {
        Self::pairs(relation, lang, true)
    }

    /// A fact prompt (without its answer) about `subject`: the opening and phrasing joined,
    /// capitalised in English.
    pub fn prompt(
        lang: Lang,
        relation: Relation,
        (opening, phrasing): (usize, usize),
        subject: &str,
    ) -> String {
        let (opening, before, after) = prompt_parts(lang, relation, opening, phrasing);
        let prompt = format!("{opening}{before}{subject}{after}");
        match lang {
            Lang::En => capitalize(&prompt),
            Lang::Ja => prompt,
        }
    }

    /// Every held-out prompt of `relation` about `subject` in `lang`: the paraphrases a fact
    /// edit is checked on (never seen in training).
    pub fn held_out_prompts(relation: Relation, lang: Lang, subject: &str) -> Vec<String> {
        Self::held_out_pairs(relation, lang)
            .into_iter()
            .map(|pair| Self::prompt(lang, relation, pair, subject))
            .collect()
    }

    /// The relation and language of a prompt template (`{}` for the subject) when it is one
    /// of the bare phrasings, ignoring case: "The capital of {} is" → capital, English.
    pub fn relation_of(template: &str) -> Option<(Relation, Lang)> {
        let wanted = template.trim().replace("{}", "{S}").to_lowercase();
        Lang::ALL.into_iter().find_map(|lang| {
            Relation::ALL.into_iter().find_map(|relation| {
                phrasings(relation, lang)
                    .iter()
                    .any(|p| p.to_lowercase() == wanted)
                    .then_some((relation, lang))
            })
        })
    }

    fn pairs(relation: Relation, lang: Lang, held_out: bool) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for o in 0..Self::openings(lang).len() {
            for p in 0..phrasings(relation, lang).len() {
                if Self::is_held_out(relation, o, p) == held_out {
                    out.push((o, p));
                }
            }
        }
        out
    }
}

/// Builds a document's text and labels together so byte offsets stay right.
struct DocBuilder {
    lang: Lang,
    text: String,
    entities: Vec<EntitySpan>,
    facts: Vec<FactSpan>,
}

impl DocBuilder {
    fn new(lang: Lang) -> Self {
        Self {
            lang,
            text: String::new(),
            entities: Vec::new(),
            facts: Vec::new(),
        }
    }

    /// Starts a sentence (space-separated in English, run-on in Japanese).
    fn sentence_break(&mut self) {
        if self.lang == Lang::En && !self.text.is_empty() {
            self.text.push(' ');
        }
    }

    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    fn push_entity(&mut self, s: &str, kind: EntityKind, country: usize, lang: Lang) {
        let start = self.text.len();
        self.text.push_str(s);
        self.entities.push(EntitySpan {
            start,
            end: self.text.len(),
            kind,
            country,
            lang,
        });
    }

    /// Appends `template`, letting `fill` write each three-character tag such as `{S}`.
    fn push_template(&mut self, template: &str, mut fill: impl FnMut(&mut Self, &str)) {
        let mut rest = template;
        while let Some(i) = rest.find('{') {
            self.push(&rest[..i]);
            let (tag, after) = rest[i..].split_at(3);
            fill(self, tag);
            rest = after;
        }
        self.push(rest);
    }

    /// Appends `template` with `{S}` the country's name in the document's language and `{O}`
    /// its name in the other one, both labelled as country mentions.
    fn push_named(&mut self, template: &str, name: &Names, country: usize) {
        let lang = self.lang;
        self.push_template(template, |doc, tag| {
            let lang = if tag == "{S}" { lang } else { lang.other() };
            doc.push_entity(name.get(lang), EntityKind::Country, country, lang);
        });
    }

    /// Whether the text stands at the start of an English sentence.
    fn at_sentence_start(&self) -> bool {
        let t = self.text.trim_end();
        t.is_empty() || t.ends_with(['.', '!', '?'])
    }

    fn finish(self) -> Document {
        Document {
            text: self.text,
            lang: self.lang,
            entities: self.entities,
            facts: self.facts,
        }
    }
}

/// Three or more of the relations, in a random order (what one document states).
fn some_relations(rng: &mut StdRng) -> Vec<Relation> {
    let mut relations = Relation::ALL.to_vec();
    relations.shuffle(rng);
    let count = rng.random_range(3..=relations.len());
    relations.truncate(count);
    relations
}

/// Upper-cases the first character (English sentence starts).
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// How the subject of a fact sentence is written.
enum Subject<'a> {
    /// The country's name (labelled as a country mention).
    Name,
    /// A reference such as "the country" (not labelled).
    Reference(&'a str),
}

impl Subject<'static> {
    /// The name with probability `name_share`, else a reference ("the country", "この国").
    fn pick(rng: &mut StdRng, lang: Lang, name_share: f64) -> Self {
        if rng.random_bool(name_share) {
            return Subject::Name;
        }
        let references = match lang {
            Lang::En => REFERENCES_EN,
            Lang::Ja => REFERENCES_JA,
        };
        Subject::Reference(references.choose(rng).copied().unwrap_or_default())
    }
}

/// The text of a sentence up to its answer, split around the subject: (before, after).
fn prompt_parts(
    lang: Lang,
    relation: Relation,
    opening: usize,
    phrasing: usize,
) -> (&'static str, &'static str, &'static str) {
    let phrase = phrasings(relation, lang)[phrasing];
    let (before, after) = phrase.split_once("{S}").unwrap_or((phrase, ""));
    (Templates::openings(lang)[opening], before, after)
}

/// The generator: the knowledge base plus a configuration.
pub struct CorpusGenerator<'a> {
    kb: &'a KnowledgeBase,
    config: CorpusConfig,
}

impl<'a> CorpusGenerator<'a> {
    pub fn new(kb: &'a KnowledgeBase, config: CorpusConfig) -> Result<Self> {
        if config.docs_per_country == 0
            && config.fact_list_docs == 0
            && config.infobox_docs_per_country == 0
            && config.docs_per_city == 0
            && config.list_docs == 0
        {
            return Err(Error::InvalidArgument {
                what: "corpus size",
                value: "0".into(),
                message:
                    "docs_per_country, fact_list_docs, infobox_docs_per_country, docs_per_city and list_docs are all zero: the corpus would be empty"
                        .into(),
            });
        }
        for (what, share) in [
            ("name_share", config.name_share),
            ("subject_first_share", config.subject_first_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(Error::InvalidArgument {
                    what: "corpus share",
                    value: format!("{what} = {share}"),
                    message: "must be between 0 and 1".into(),
                });
            }
        }
        Ok(Self { kb, config })
    }

    /// All training documents, shuffled, identical for identical seeds.
    pub fn training_documents(&self) -> Vec<Document> {
        let mut rng = StdRng::seed_from_u64(self.config.seed);
        let mut docs = Vec::new();
        for lang in Lang::ALL {
            for country in 0..self.kb.countries.len() {
                for _ in 0..self.config.docs_per_country {
                    docs.push(self.paragraph(&mut rng, country, lang));
                }
            }
            for _ in 0..self.config.fact_list_docs {
                docs.push(self.fact_list(&mut rng, lang));
            }
            for country in 0..self.kb.countries.len() {
                for _ in 0..self.config.infobox_docs_per_country {
                    docs.push(self.infobox(&mut rng, country, lang));
                }
                for city in 0..self.kb.countries[country].cities.len() {
                    for _ in 0..self.config.docs_per_city {
                        docs.push(self.city_doc(&mut rng, country, city, lang));
                    }
                }
            }
        }
        // Drawn after everything else, so recipes without lists keep their RNG stream.
        for _ in 0..self.config.list_docs {
            docs.push(self.relation_list(&mut rng));
        }
        docs.shuffle(&mut rng);
        docs
    }

    /// A paragraph about one country: intro, then attributes in random order, fillers and a
    /// fact about another country mixed in.
    fn paragraph(&self, rng: &mut StdRng, country: usize, lang: Lang) -> Document {
        let c = &self.kb.countries[country];
        let mut doc = DocBuilder::new(lang);
        let intros = match lang {
            Lang::En => INTROS_EN,
            Lang::Ja => INTROS_JA,
        };
        let intro = intros.choose(rng).copied().unwrap_or("{S}");
        // Intro: the subject's name, and often its name in the other language.
        doc.push_named(intro, &c.name, country);

        let relations = some_relations(rng);
        let fillers = match lang {
            Lang::En => FILLERS_EN,
            Lang::Ja => FILLERS_JA,
        };
        for &relation in &relations {
            if rng.random_bool(0.2) {
                doc.sentence_break();
                doc.push(fillers.choose(rng).copied().unwrap_or_default());
            }
            let subject = Subject::pick(rng, lang, self.config.name_share);
            self.fact_sentence(rng, &mut doc, country, relation, subject);
        }
        if !c.cities.is_empty() && rng.random_bool(0.5) {
            let subject = Subject::pick(rng, lang, self.config.name_share);
            self.city_sentence(rng, &mut doc, country, subject);
        }
        if rng.random_bool(0.3) {
            // A true fact about another country, so a paragraph is not only about one subject.
            let other = rng.random_range(0..self.kb.countries.len());
            let relation = *Relation::ALL.choose(rng).unwrap_or(&Relation::Capital);
            self.fact_sentence(rng, &mut doc, other, relation, Subject::Name);
        }
        doc.finish()
    }

    /// A sentence naming one or two other cities of `country`.
    fn city_sentence(
        &self,
        rng: &mut StdRng,
        doc: &mut DocBuilder,
        country: usize,
        subject: Subject,
    ) {
        let lang = doc.lang;
        let c = &self.kb.countries[country];
        let templates = match lang {
            Lang::En => CITY_SENTENCES_EN,
            Lang::Ja => CITY_SENTENCES_JA,
        };
        let template = templates.choose(rng).copied().unwrap_or("{C}");
        let count = if c.cities.len() > 1 && rng.random_bool(0.5) {
            2
        } else {
            1
        };
        let cities: Vec<_> = c.cities.choose_multiple(rng, count).collect();
        doc.sentence_break();
        doc.push_template(template, |doc, tag| match tag {
            "{S}" => match subject {
                Subject::Name => {
                    doc.push_entity(c.name.get(lang), EntityKind::Country, country, lang)
                }
                Subject::Reference(r) if lang == Lang::En && doc.at_sentence_start() => {
                    doc.push(&capitalize(r))
                }
                Subject::Reference(r) => doc.push(r),
            },
            _ => {
                for (i, city) in cities.iter().enumerate() {
                    if i > 0 {
                        doc.push(if lang == Lang::En { " and " } else { "や" });
                    }
                    doc.push_entity(city.get(lang), EntityKind::City, country, lang);
                }
            }
        });
    }

    /// An infobox: the subject first, then several attributes as "key: value" fields in a
    /// random order, each labelled as a fact.
    fn infobox(&self, rng: &mut StdRng, country: usize, lang: Lang) -> Document {
        let c = &self.kb.countries[country];
        let mut doc = DocBuilder::new(lang);
        let heads = match lang {
            Lang::En => INFOBOX_HEADS_EN,
            Lang::Ja => INFOBOX_HEADS_JA,
        };
        let head = heads.choose(rng).copied().unwrap_or("{S} ");
        doc.push_named(head, &c.name, country);
        let relations = some_relations(rng);
        for (i, &relation) in relations.iter().enumerate() {
            if i > 0 {
                doc.push(if lang == Lang::En { "; " } else { "、" });
            }
            let start = doc.text.len();
            let key = infobox_keys(relation, lang)
                .choose(rng)
                .copied()
                .unwrap_or("");
            doc.push(key);
            doc.push(if lang == Lang::En { ": " } else { "：" });
            let value = c.attribute(relation);
            doc.push_entity(value.get(lang), relation.value_kind(), country, lang);
            doc.facts.push(FactSpan {
                start,
                end: doc.text.len(),
                relation,
                country,
            });
        }
        doc.push(if lang == Lang::En { "." } else { "。" });
        doc.finish()
    }

    /// A short document about one city: which country it is in, a filler, and sometimes a
    /// fact about that country.
    fn city_doc(&self, rng: &mut StdRng, country: usize, city: usize, lang: Lang) -> Document {
        let c = &self.kb.countries[country];
        let mut doc = DocBuilder::new(lang);
        let templates = match lang {
            Lang::En => CITY_DOCS_EN,
            Lang::Ja => CITY_DOCS_JA,
        };
        let template = templates.choose(rng).copied().unwrap_or("{C}");
        doc.push_template(template, |doc, tag| match tag {
            "{S}" => doc.push_entity(c.name.get(lang), EntityKind::Country, country, lang),
            _ => doc.push_entity(c.cities[city].get(lang), EntityKind::City, country, lang),
        });
        if rng.random_bool(0.5) {
            let fillers = match lang {
                Lang::En => FILLERS_EN,
                Lang::Ja => FILLERS_JA,
            };
            doc.sentence_break();
            doc.push(fillers.choose(rng).copied().unwrap_or_default());
        }
        if rng.random_bool(0.5) {
            let relation = *Relation::ALL.choose(rng).unwrap_or(&Relation::Capital);
            self.fact_sentence(rng, &mut doc, country, relation, Subject::Name);
        }
        doc.finish()
    }

    /// A relation list: a heading that names the relation, then "subject answer" entries.
    /// Nothing stands between a subject and its answer, so the answer must be predicted at the
    /// subject's own last token, the pressure thought to make large models enrich a subject
    /// with its attributes (issue 3, point 8). Tried once (assets/README.md): the lists were
    /// learned, but prose prompts kept their final-token lookup. English only: a Japanese
    /// answer after a space would be another token than the answer after a particle.
    fn relation_list(&self, rng: &mut StdRng) -> Document {
        let mut doc = DocBuilder::new(Lang::En);
        let relation = *Relation::ALL.choose(rng).unwrap_or(&Relation::Capital);
        doc.push(
            list_heads(relation)
                .choose(rng)
                .copied()
                .unwrap_or_default(),
        );
        let count = rng.random_range(4..=8).min(self.kb.countries.len());
        let countries = rand::seq::index::sample(rng, self.kb.countries.len(), count);
        for (i, country) in countries.iter().enumerate() {
            doc.push(if i > 0 { ", " } else { " " });
            let c = &self.kb.countries[country];
            let start = doc.text.len();
            doc.push_entity(&c.name.en, EntityKind::Country, country, Lang::En);
            doc.push(" ");
            let value = c.attribute(relation);
            doc.push_entity(&value.en, relation.value_kind(), country, Lang::En);
            doc.facts.push(FactSpan {
                start,
                end: doc.text.len(),
                relation,
                country,
            });
        }
        doc.push(".");
        doc.finish()
    }

    /// Several facts about random countries, each naming its subject.
    fn fact_list(&self, rng: &mut StdRng, lang: Lang) -> Document {
        let mut doc = DocBuilder::new(lang);
        for _ in 0..rng.random_range(2..=4) {
            let country = rng.random_range(0..self.kb.countries.len());
            let relation = *Relation::ALL.choose(rng).unwrap_or(&Relation::Capital);
            self.fact_sentence(rng, &mut doc, country, relation, Subject::Name);
        }
        doc.finish()
    }

    /// Appends one fact sentence built from a training (opening, phrasing) pair.
    fn fact_sentence(
        &self,
        rng: &mut StdRng,
        doc: &mut DocBuilder,
        country: usize,
        relation: Relation,
        subject: Subject,
    ) {
        let lang = doc.lang;
        let c = &self.kb.countries[country];
        let mut pairs = Templates::training_pairs(relation, lang);
        if self.config.subject_first_share > 0.0 && rng.random_bool(self.config.subject_first_share)
        {
            let phrases = phrasings(relation, lang);
            let subject_first: Vec<_> = pairs
                .iter()
                .copied()
                .filter(|&(_, p)| phrases[p].starts_with("{S}"))
                .collect();
            if !subject_first.is_empty() {
                pairs = subject_first;
            }
        }
        let &(o, p) = pairs.choose(rng).unwrap_or(&(0, 0));
        let (opening, before, after) = prompt_parts(lang, relation, o, p);
        doc.sentence_break();
        let start = doc.text.len();
        let head = format!("{opening}{before}");
        let head = if lang == Lang::En {
            capitalize(&head)
        } else {
            head
        };
        doc.push(&head);
        match subject {
            Subject::Name => doc.push_entity(c.name.get(lang), EntityKind::Country, country, lang),
            Subject::Reference(r) => {
                if head.is_empty() && lang == Lang::En {
                    doc.push(&capitalize(r));
                } else {
                    doc.push(r);
                }
            }
        }
        doc.push(after);
        if lang == Lang::En {
            doc.push(" ");
        }
        let value = c.attribute(relation);
        doc.push_entity(value.get(lang), relation.value_kind(), country, lang);
        if rng.random_bool(0.15) {
            // A mixed-language mention: "Tokyo (東京)", "東京（Tokyo）".
            let (open, close) = match lang {
                Lang::En => (" (", ")"),
                Lang::Ja => ("（", "）"),
            };
            doc.push(open);
            doc.push_entity(
                value.get(lang.other()),
                relation.value_kind(),
                country,
                lang.other(),
            );
            doc.push(close);
        }
        doc.push(Templates::endings(lang).choose(rng).copied().unwrap_or("."));
        doc.facts.push(FactSpan {
            start,
            end: doc.text.len(),
            relation,
            country,
        });
    }

    /// One held-out prompt per country, relation and language.
    pub fn eval_items(&self) -> Vec<EvalItem> {
        let mut items = Vec::new();
        for lang in Lang::ALL {
            for relation in Relation::ALL {
                let pairs = Templates::held_out_pairs(relation, lang);
                for (i, c) in self.kb.countries.iter().enumerate() {
                    let pair = pairs[(i * 31 + relation as usize) % pairs.len()];
                    let subject = c.name.get(lang);
                    let prompt = Templates::prompt(lang, relation, pair, subject);
                    let mut answer = c.attribute(relation).get(lang).to_string();
                    if lang == Lang::En {
                        answer.insert(0, ' ');
                    }
                    items.push(EvalItem {
                        country: i,
                        relation,
                        lang,
                        prompt,
                        subject: subject.to_string(),
                        answer,
                    });
                }
            }
        }
        items
    }
}

/// A token's ground-truth labels.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TokenLabel {
    pub id: u32,
    /// Entity kind of the mention the token belongs to, if any.
    pub kind: Option<EntityKind>,
    /// Relation of the fact sentence the token belongs to, if any.
    pub relation: Option<Relation>,
    /// Language of the mention (or of the document outside mentions).
    pub lang: Lang,
    /// Country the mention or fact is about.
    pub country: Option<usize>,
}

/// Maps a document's character-level labels onto its tokens (`offsets` are each token's byte
/// range, as [`crate::model::Tokenizer::encode_with_offsets`] returns them). A token takes a
/// span's label when it overlaps the span.
pub fn token_labels(doc: &Document, ids: &[u32], offsets: &[(usize, usize)]) -> Vec<TokenLabel> {
    let overlaps = |(s, e): (usize, usize), start: usize, end: usize| s < end && start < e;
    ids.iter()
        .zip(offsets)
        .map(|(&id, &range)| {
            let entity = doc
                .entities
                .iter()
                .find(|m| overlaps(range, m.start, m.end));
            let fact = doc.facts.iter().find(|f| overlaps(range, f.start, f.end));
            TokenLabel {
                id,
                kind: entity.map(|m| m.kind),
                relation: fact.map(|f| f.relation),
                lang: entity.map_or(doc.lang, |m| m.lang),
                country: entity.map(|m| m.country).or(fact.map(|f| f.country)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_opening_and_phrasing_is_trained_and_some_pairs_are_held_out() {
        for lang in Lang::ALL {
            for relation in Relation::ALL {
                let train = Templates::training_pairs(relation, lang);
                let held = Templates::held_out_pairs(relation, lang);
                assert!(
                    held.len() >= 3,
                    "{relation} {lang}: {} held out",
                    held.len()
                );
                for o in 0..Templates::openings(lang).len() {
                    assert!(train.iter().any(|&(to, _)| to == o));
                }
                for p in 0..phrasings(relation, lang).len() {
                    assert!(train.iter().any(|&(_, tp)| tp == p));
                }
            }
        }
    }

    #[test]
    fn spans_cover_the_named_text() {
        let kb = KnowledgeBase::bundled().unwrap();
        let config = CorpusConfig {
            seed: 3,
            docs_per_country: 1,
            fact_list_docs: 5,
            infobox_docs_per_country: 1,
            docs_per_city: 1,
            ..CorpusConfig::default()
        };
        let docs = CorpusGenerator::new(&kb, config)
            .unwrap()
            .training_documents();
        for doc in &docs {
            for m in &doc.entities {
                let c = &kb.countries[m.country];
                let text = &doc.text[m.start..m.end];
                let expected = match m.kind {
                    EntityKind::Country => c.name.get(m.lang),
                    EntityKind::Capital => c.capital.get(m.lang),
                    EntityKind::Language => c.language.get(m.lang),
                    EntityKind::Currency => c.currency.get(m.lang),
                    EntityKind::Continent => c.continent.get(m.lang),
                    EntityKind::City => {
                        // The largest city, or one of the other cities of cities.tsv.
                        let other = c.cities.iter().find(|n| n.get(m.lang) == text);
                        other.map_or(c.largest_city.get(m.lang), |n| n.get(m.lang))
                    }
                    EntityKind::Landmark => c.landmark.get(m.lang),
                };
                assert_eq!(text, expected, "in {:?}", doc.text);
            }
        }
    }
}
