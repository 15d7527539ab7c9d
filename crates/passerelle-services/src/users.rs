//! The `users` resource.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::api::FieldError;
use crate::db::{Columns, Field};
use crate::resource::Resource;
use crate::validate;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
    pub version: i64,
}

/// The body of `POST /users` and `PUT /users/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserInput {
    pub username: String,
    pub email: String,
    pub name: String,
}

const FIRST: &[&str] = &[
    "Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances", "Edsger",
    "Radia", "Tim",
];
const LAST: &[&str] = &[
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Ritchie",
    "Liskov",
    "Thompson",
    "Allen",
    "Dijkstra",
    "Perlman",
    "Berners-Lee",
];

impl Resource for User {
    const SINGULAR: &'static str = "user";
    const PLURAL: &'static str = "users";
    const FIELDS: &'static [&'static str] = &["username", "email", "name"];
    type Input = UserInput;

    fn validate(input: UserInput) -> Result<Vec<Field>, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut check = |field: &str, r: Result<String, String>| match r {
            Ok(v) => Some(v),
            Err(m) => {
                errors.push(FieldError::new(field, m));
                None
            }
        };
        let username = check("username", validate::username(&input.username));
        let email = check("email", validate::email(&input.email));
        let name = check("name", validate::text(&input.name, 1, 100));
        match (username, email, name) {
            (Some(u), Some(e), Some(n)) => Ok(vec![Field::Text(u), Field::Text(e), Field::Text(n)]),
            _ => Err(errors),
        }
    }

    fn from_row<C: Columns>(row: &C) -> Result<Self, C::Error> {
        Ok(User {
            id: row.integer(0)?,
            username: row.text(1)?,
            email: row.text(2)?,
            name: row.text(3)?,
            created_at: row.text(4)?,
            updated_at: row.text(5)?,
            version: row.integer(6)?,
        })
    }

    fn to_input(&self) -> Map<String, Value> {
        match json!({ "username": self.username, "email": self.email, "name": self.name }) {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn demo(i: u64) -> UserInput {
        let first = FIRST[(i as usize * 7) % FIRST.len()];
        let last = LAST[(i as usize * 5 + i as usize / FIRST.len()) % LAST.len()];
        UserInput {
            username: format!("user_{i}"),
            email: format!("user_{i}@example.com"),
            name: format!("{first} {last}"),
        }
    }

    fn id(&self) -> i64 {
        self.id
    }
    fn version(&self) -> i64 {
        self.version
    }
}
