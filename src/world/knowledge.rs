//! The knowledge base of the world model: real countries and their attributes in English and
//! Japanese, read from `assets/knowledge/countries.tsv` and validated row by row, plus other
//! notable cities of some countries from `cities.tsv` beside it (so the corpus names cities
//! such as Yokohama that an edit may move a capital to).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// The knowledge base shipped with monoscope.
pub fn bundled_knowledge_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/knowledge/countries.tsv")
}

/// The optional file of other cities, read from the countries file's folder.
pub const CITIES_FILE: &str = "cities.tsv";

/// The columns of the cities TSV, in order.
pub const CITY_COLUMNS: [&str; 3] = ["country_en", "city_en", "city_ja"];

/// A language of the world corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    En,
    Ja,
}

impl Lang {
    pub const ALL: [Lang; 2] = [Lang::En, Lang::Ja];

    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Ja => "ja",
        }
    }

    pub fn other(self) -> Lang {
        match self {
            Lang::En => Lang::Ja,
            Lang::Ja => Lang::En,
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A relation from a country to one of its attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    Capital,
    Language,
    Currency,
    Continent,
    LargestCity,
    Landmark,
}

impl Relation {
    pub const ALL: [Relation; 6] = [
        Relation::Capital,
        Relation::Language,
        Relation::Currency,
        Relation::Continent,
        Relation::LargestCity,
        Relation::Landmark,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Relation::Capital => "capital",
            Relation::Language => "language",
            Relation::Currency => "currency",
            Relation::Continent => "continent",
            Relation::LargestCity => "largest_city",
            Relation::Landmark => "landmark",
        }
    }

    /// The kind of entity this relation points at.
    pub fn value_kind(self) -> EntityKind {
        match self {
            Relation::Capital => EntityKind::Capital,
            Relation::Language => EntityKind::Language,
            Relation::Currency => EntityKind::Currency,
            Relation::Continent => EntityKind::Continent,
            Relation::LargestCity => EntityKind::City,
            Relation::Landmark => EntityKind::Landmark,
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an entity mention in the corpus is: the ground-truth concept labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    Country,
    Capital,
    Language,
    Currency,
    Continent,
    City,
    Landmark,
}

impl EntityKind {
    pub const ALL: [EntityKind; 7] = [
        EntityKind::Country,
        EntityKind::Capital,
        EntityKind::Language,
        EntityKind::Currency,
        EntityKind::Continent,
        EntityKind::City,
        EntityKind::Landmark,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EntityKind::Country => "country",
            EntityKind::Capital => "capital",
            EntityKind::Language => "language",
            EntityKind::Currency => "currency",
            EntityKind::Continent => "continent",
            EntityKind::City => "city",
            EntityKind::Landmark => "landmark",
        }
    }
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name in both languages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Names {
    pub en: String,
    pub ja: String,
}

impl Names {
    pub fn get(&self, lang: Lang) -> &str {
        match lang {
            Lang::En => &self.en,
            Lang::Ja => &self.ja,
        }
    }
}

/// One country and its attributes.
#[derive(Clone, Debug, Serialize)]
pub struct Country {
    pub name: Names,
    pub capital: Names,
    pub language: Names,
    pub currency: Names,
    pub continent: Names,
    pub largest_city: Names,
    pub landmark: Names,
    /// Other notable cities (neither the capital nor the largest city); often empty.
    pub cities: Vec<Names>,
}

impl Country {
    pub fn attribute(&self, relation: Relation) -> &Names {
        match relation {
            Relation::Capital => &self.capital,
            Relation::Language => &self.language,
            Relation::Currency => &self.currency,
            Relation::Continent => &self.continent,
            Relation::LargestCity => &self.largest_city,
            Relation::Landmark => &self.landmark,
        }
    }

    /// The country's name for an entity of `kind` (its own name for `Country`).
    pub fn entity(&self, kind: EntityKind) -> &Names {
        match kind {
            EntityKind::Country => &self.name,
            EntityKind::Capital => &self.capital,
            EntityKind::Language => &self.language,
            EntityKind::Currency => &self.currency,
            EntityKind::Continent => &self.continent,
            EntityKind::City => &self.largest_city,
            EntityKind::Landmark => &self.landmark,
        }
    }
}

/// The columns of the TSV, in order.
pub const COLUMNS: [&str; 14] = [
    "country_en",
    "country_ja",
    "capital_en",
    "capital_ja",
    "language_en",
    "language_ja",
    "currency_en",
    "currency_ja",
    "continent_en",
    "continent_ja",
    "largest_city_en",
    "largest_city_ja",
    "landmark_en",
    "landmark_ja",
];

/// The rows of a tab-separated file whose first line names `columns`: (line number, fields),
/// each row with exactly that many non-empty fields without stray spaces. Blank lines are
/// skipped; errors give the file, line and column.
fn tsv_rows<'t>(
    path: &Path,
    text: &'t str,
    columns: &[&str],
) -> Result<Vec<(usize, Vec<&'t str>)>> {
    let bad = |line: usize, message: String| Error::DataFile {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let (_, header) = lines
        .next()
        .ok_or_else(|| bad(1, "the file is empty; expected a header line".into()))?;
    let header: Vec<&str> = header.trim_end_matches('\r').split('\t').collect();
    if header != columns {
        return Err(bad(
            1,
            format!("header is {header:?}; expected the tab-separated columns {columns:?}"),
        ));
    }
    let mut rows = Vec::new();
    for (line, row) in lines {
        let row = row.trim_end_matches('\r');
        if row.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = row.split('\t').collect();
        if fields.len() != columns.len() {
            return Err(bad(
                line,
                format!(
                    "{} tab-separated fields; expected {}",
                    fields.len(),
                    columns.len()
                ),
            ));
        }
        for (column, field) in columns.iter().zip(&fields) {
            if field.trim().is_empty() {
                return Err(bad(line, format!("column `{column}` is empty")));
            }
            if field.trim() != *field {
                return Err(bad(
                    line,
                    format!("column `{column}` has leading or trailing spaces: {field:?}"),
                ));
            }
        }
        rows.push((line, fields));
    }
    Ok(rows)
}

/// All countries of the world.
#[derive(Clone, Debug)]
pub struct KnowledgeBase {
    pub path: PathBuf,
    pub countries: Vec<Country>,
}

impl KnowledgeBase {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "knowledge base (TSV)",
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut kb = Self::parse(path, &text)?;
        let cities = path.with_file_name(CITIES_FILE);
        if cities.is_file() {
            let text = std::fs::read_to_string(&cities).map_err(|e| Error::io(&cities, e))?;
            kb.add_cities(&cities, &text)?;
        }
        Ok(kb)
    }

    /// Parses the cities TSV (header [`CITY_COLUMNS`], one city per line) into the countries
    /// it names. A city must belong to a known country, be new, and be neither that country's
    /// capital nor its largest city; errors give the file, line and column.
    pub fn add_cities(&mut self, path: &Path, text: &str) -> Result<()> {
        let bad = |line: usize, message: String| Error::DataFile {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut seen = HashSet::new();
        for (line, fields) in tsv_rows(path, text, &CITY_COLUMNS)? {
            let country = self
                .countries
                .iter()
                .position(|c| c.name.en == fields[0])
                .ok_or_else(|| bad(line, format!("unknown country `{}`", fields[0])))?;
            let city = Names {
                en: fields[1].to_string(),
                ja: fields[2].to_string(),
            };
            let c = &mut self.countries[country];
            if city == c.capital || city == c.largest_city {
                return Err(bad(
                    line,
                    format!(
                        "`{}` is already {}'s capital or largest city",
                        city.en, c.name.en
                    ),
                ));
            }
            if !seen.insert(city.en.clone()) || !seen.insert(city.ja.clone()) {
                return Err(bad(line, format!("city `{}` appears twice", city.en)));
            }
            c.cities.push(city);
        }
        Ok(())
    }

    pub fn bundled() -> Result<Self> {
        Self::load(&bundled_knowledge_path())
    }

    /// Parses TSV text: a header naming [`COLUMNS`], then one country per line. Every field
    /// must be non-empty and country names unique; errors give the file, line and column.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |line: usize, message: String| Error::DataFile {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut countries = Vec::new();
        let mut seen_en = HashSet::new();
        let mut seen_ja = HashSet::new();
        for (line, fields) in tsv_rows(path, text, &COLUMNS)? {
            let names = |i: usize| Names {
                en: fields[i].to_string(),
                ja: fields[i + 1].to_string(),
            };
            let country = Country {
                name: names(0),
                capital: names(2),
                language: names(4),
                currency: names(6),
                continent: names(8),
                largest_city: names(10),
                landmark: names(12),
                cities: Vec::new(),
            };
            if !seen_en.insert(country.name.en.clone()) {
                return Err(bad(
                    line,
                    format!("country `{}` appears twice", country.name.en),
                ));
            }
            if !seen_ja.insert(country.name.ja.clone()) {
                return Err(bad(
                    line,
                    format!("Japanese country name `{}` appears twice", country.name.ja),
                ));
            }
            countries.push(country);
        }
        if countries.is_empty() {
            return Err(bad(1, "no country rows after the header".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            countries,
        })
    }

    /// Every country name, English and Japanese: the subjects whose embeddings set the
    /// causal-trace noise scale.
    pub fn subject_names(&self) -> Vec<String> {
        self.countries
            .iter()
            .flat_map(|c| Lang::ALL.map(|l| c.name.get(l).to_string()))
            .collect()
    }

    /// Index of the country with this English or Japanese name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.countries
            .iter()
            .position(|c| c.name.en == name || c.name.ja == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_knowledge_base_is_valid_and_large_enough() {
        let kb = KnowledgeBase::bundled().unwrap();
        assert!(
            kb.countries.len() >= 150,
            "{} countries",
            kb.countries.len()
        );
        let japan = &kb.countries[kb.find("Japan").unwrap()];
        assert_eq!(japan.capital.en, "Tokyo");
        assert_eq!(japan.capital.ja, "東京");
        assert_eq!(kb.find("日本"), kb.find("Japan"));
        assert!(
            japan
                .cities
                .iter()
                .any(|c| c.en == "Yokohama" && c.ja == "横浜")
        );
    }
}
