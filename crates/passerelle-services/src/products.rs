//! The `products` resource. Prices are exact: stored as integer cents, accepted as
//! `price_cents` (integer) or `price` (a decimal string like `"19.99"`, or a JSON number with
//! at most two decimals, read from its text, never through a float), and returned as both.

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value, json};

use crate::api::FieldError;
use crate::db::{Columns, Field};
use crate::resource::{Resource, merge_patch};
use crate::validate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    pub created_at: String,
    pub updated_at: String,
    pub version: i64,
}

impl Serialize for Product {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Repr<'a> {
            id: i64,
            name: &'a str,
            description: &'a str,
            price: String,
            price_cents: i64,
            currency: &'a str,
            created_at: &'a str,
            updated_at: &'a str,
            version: i64,
        }
        Repr {
            id: self.id,
            name: &self.name,
            description: &self.description,
            price: validate::format_cents(self.price_cents),
            price_cents: self.price_cents,
            currency: &self.currency,
            created_at: &self.created_at,
            updated_at: &self.updated_at,
            version: self.version,
        }
        .serialize(s)
    }
}

/// A price as the client wrote it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PriceText {
    Number(serde_json::Number),
    Text(String),
}

/// The body of `POST /products` and `PUT /products/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductInput {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub price: Option<PriceText>,
    pub price_cents: Option<i64>,
    #[serde(default = "default_currency")]
    pub currency: String,
}

fn default_currency() -> String {
    "EUR".into()
}

const ADJECTIVES: &[&str] = &[
    "Compact", "Sturdy", "Silent", "Bright", "Classic", "Portable", "Smart", "Eco",
];
const NOUNS: &[&str] = &[
    "Lamp",
    "Kettle",
    "Backpack",
    "Keyboard",
    "Chair",
    "Headphones",
    "Bottle",
    "Notebook",
    "Drill",
];

impl Resource for Product {
    const SINGULAR: &'static str = "product";
    const PLURAL: &'static str = "products";
    const FIELDS: &'static [&'static str] = &["name", "description", "price_cents", "currency"];
    type Input = ProductInput;

    fn validate(input: ProductInput) -> Result<Vec<Field>, Vec<FieldError>> {
        let mut errors = Vec::new();
        let name = validate::text(&input.name, 1, 200)
            .map_err(|m| errors.push(FieldError::new("name", m)))
            .ok();
        let description = validate::text(&input.description, 0, 2000)
            .map_err(|m| errors.push(FieldError::new("description", m)))
            .ok();
        let cents = match (&input.price, input.price_cents) {
            (Some(_), Some(_)) => {
                errors.push(FieldError::new(
                    "price",
                    "give either price or price_cents, not both",
                ));
                None
            }
            (None, None) => {
                errors.push(FieldError::new(
                    "price",
                    "price (e.g. \"19.99\") or price_cents is required",
                ));
                None
            }
            (None, Some(c)) => validate::cents_in_range(c)
                .map_err(|m| errors.push(FieldError::new("price_cents", m)))
                .ok(),
            (Some(PriceText::Text(t)), None) => validate::price(t)
                .map_err(|m| errors.push(FieldError::new("price", m)))
                .ok(),
            (Some(PriceText::Number(n)), None) => validate::price(&n.to_string())
                .map_err(|m| errors.push(FieldError::new("price", m)))
                .ok(),
        };
        let currency = validate::currency(&input.currency)
            .map_err(|m| errors.push(FieldError::new("currency", m)))
            .ok();
        match (name, description, cents, currency) {
            (Some(n), Some(d), Some(c), Some(cur)) if errors.is_empty() => Ok(vec![
                Field::Text(n),
                Field::Text(d),
                Field::Integer(c),
                Field::Text(cur),
            ]),
            _ => Err(errors),
        }
    }

    fn from_row<C: Columns>(row: &C) -> Result<Self, C::Error> {
        Ok(Product {
            id: row.integer(0)?,
            name: row.text(1)?,
            description: row.text(2)?,
            price_cents: row.integer(3)?,
            currency: row.text(4)?,
            created_at: row.text(5)?,
            updated_at: row.text(6)?,
            version: row.integer(7)?,
        })
    }

    fn to_input(&self) -> Map<String, Value> {
        match json!({
            "name": self.name,
            "description": self.description,
            "price_cents": self.price_cents,
            "currency": self.currency,
        }) {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// A patch that sets `price` replaces the stored `price_cents` (and the other way round).
    fn merge_patch(current: &mut Map<String, Value>, patch: Map<String, Value>) {
        if patch.contains_key("price") {
            current.remove("price_cents");
        }
        if patch.contains_key("price_cents") {
            current.remove("price");
        }
        merge_patch(current, patch);
    }

    fn demo(i: u64) -> ProductInput {
        let adj = ADJECTIVES[(i as usize * 3) % ADJECTIVES.len()];
        let noun = NOUNS[(i as usize * 7 + i as usize / ADJECTIVES.len()) % NOUNS.len()];
        ProductInput {
            name: format!("{adj} {noun} {i}"),
            description: format!("Demo product number {i}."),
            price: None,
            price_cents: Some(199 + ((i * 7919) % 99_800) as i64),
            currency: default_currency(),
        }
    }

    fn id(&self) -> i64 {
        self.id
    }
    fn version(&self) -> i64 {
        self.version
    }
}
