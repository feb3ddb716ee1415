//! Fixed vocabularies the `fake` crate has no faker for.

/// Product categories (`product.category`).
pub const CATEGORIES: &[&str] = &[
    "electronics",
    "home_kitchen",
    "fashion",
    "beauty",
    "sports_outdoors",
    "toys_games",
    "books",
    "grocery",
    "health",
    "garden",
    "automotive",
    "pet_supplies",
];

/// Adjectives for product names.
pub const ADJECTIVES: &[&str] = &[
    "Ergonomic",
    "Rustic",
    "Sleek",
    "Handcrafted",
    "Compact",
    "Premium",
    "Organic",
    "Wireless",
    "Vintage",
    "Lightweight",
    "Durable",
    "Smart",
];

/// Materials for product names.
pub const MATERIALS: &[&str] = &[
    "Bamboo", "Steel", "Cotton", "Leather", "Ceramic", "Oak", "Wool", "Glass", "Granite", "Linen",
];

/// Nouns for product names.
pub const NOUNS: &[&str] = &[
    "Chair",
    "Lamp",
    "Backpack",
    "Headphones",
    "Water Bottle",
    "Notebook",
    "Sneakers",
    "Mug",
    "Yoga Mat",
    "Desk Organizer",
    "Candle",
    "Jacket",
    "Speaker",
    "Cutting Board",
    "Plant Pot",
];

/// Product tags.
pub const TAGS: &[&str] = &[
    "bestseller",
    "eco",
    "new",
    "limited",
    "gift",
    "sale",
    "handmade",
    "imported",
];

/// Warehouses (`stock.warehouse`).
pub const WAREHOUSES: &[&str] = &["AMS-1", "FRA-2", "IAD-1", "SFO-3", "SIN-1"];

/// Subscription plans with weights (`customer.subscription_plan`).
pub const PLANS: &[(&str, u32)] = &[
    ("free", 40),
    ("basic", 30),
    ("premium", 20),
    ("enterprise", 10),
];

/// Payment methods with weights (`transaction.payment_method`).
pub const PAYMENT_METHODS: &[(&str, u32)] = &[
    ("credit_card", 45),
    ("debit_card", 15),
    ("paypal", 20),
    ("apple_pay", 10),
    ("google_pay", 6),
    ("bank_transfer", 4),
];

/// Interaction types with weights (`interaction.interaction_type`).
pub const INTERACTIONS: &[(&str, u32)] = &[
    ("view", 45),
    ("click", 20),
    ("search", 15),
    ("cart_add", 10),
    ("cart_abandonment", 5),
    ("support_ticket", 5),
];

/// The carriers of a fresh platform: name and tracking URL template.
pub const CARRIERS: &[(&str, &str)] = &[
    ("UPS", "https://www.ups.com/track?tracknum={code}"),
    ("FedEx", "https://www.fedex.com/fedextrack/?trknbr={code}"),
    (
        "DHL Express",
        "https://www.dhl.com/track?tracking-id={code}",
    ),
    (
        "USPS",
        "https://tools.usps.com/go/TrackConfirmAction?tLabels={code}",
    ),
    ("GLS", "https://gls-group.com/track/{code}"),
    ("DPD", "https://tracking.dpd.de/status/en_US/parcel/{code}"),
];

/// Devices in behaviour payloads.
pub const DEVICES: &[&str] = &["ios", "android", "desktop", "tablet"];

/// Referrers in behaviour payloads.
pub const REFERRERS: &[&str] = &["direct", "google", "instagram", "newsletter", "tiktok"];

/// Support ticket subjects.
pub const TICKET_SUBJECTS: &[&str] = &[
    "Where is my order?",
    "Wrong size delivered",
    "Refund not received",
    "Damaged item",
    "Change delivery address",
    "Discount code not working",
];
