//! The CEL rules the CRDs carry, and the limits behind them. Pure data.
//!
//! The API server runs these at `kubectl apply`, so input that the operator could not
//! build, or that the API server would refuse later on one of the cell's objects, is
//! refused at once with a message naming the field and the fix.
//!
//! The API server estimates each rule's worst-case cost from the schema's bounds (string
//! lengths, list and map sizes) and refuses a CRD whose rules could cost too much. A
//! CellSet holds up to 64 per-cell overrides of three stores each, so every string that a
//! rule reads has a tight `maxLength` and every map a `maxProperties`.

use kube::core::Rule;

/// Longest Cell name. The longest names derived from it are the pods' controller revision
/// labels of the store StatefulSets, `<cell>-mysql-<10-character hash>` (17 characters
/// added), and Kubernetes limits names and label values to 63 characters.
pub const MAX_CELL_NAME_LEN: usize = 63 - "-mysql-".len() - 10;

/// Characters a CellSet adds to its name to name a cell: `-<region>-<index>`, the index
/// below 256 (`spec.regions[].cells` is at most 256).
pub const STAMP_OVERHEAD: usize = "--255".len();

/// Longest quantity string (`"500m"`, `"16Gi"`, `"1.5e3"`).
pub const MAX_QUANTITY_LEN: usize = 32;
/// Most resources in one `requests` or `limits` map.
pub const MAX_RESOURCES: usize = 8;
/// Longest external store endpoint list (Kafka: comma-separated brokers).
pub const MAX_ENDPOINT_LEN: usize = 256;

const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Names of Services must also start with a letter (DNS-1035), and a cell names its own.
const DNS_1035_LABEL: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
const LABEL_VALUE: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
const HOST_PORT: &str = "[^:/, ]+:[0-9]{1,5}";

/// `field` must be a DNS label (region and platform names end up in labels and names).
pub fn dns_label(field: &str, example: &str) -> Rule {
    Rule::new(format!("self.matches('{DNS_LABEL}')")).message(
        format!("{field} must be a DNS label (lowercase letters, digits, '-'), e.g. '{example}'")
            .as_str(),
    )
}

/// `field` is used as a label value (zones).
pub fn label_value(field: &str) -> Rule {
    Rule::new(format!("self.matches('{LABEL_VALUE}')")).message(
        format!("{field} must be a Kubernetes label value (letters, digits, '-', '_', '.'; starting and ending with a letter or digit), e.g. 'us-east-1a'").as_str(),
    )
}

/// Every item of the list `field` is used as a label value.
pub fn label_values(field: &str) -> Rule {
    Rule::new(format!("self.all(z, z.matches('{LABEL_VALUE}'))")).message(
        format!("{field} must be Kubernetes label values (letters, digits, '-', '_', '.'; starting and ending with a letter or digit), e.g. 'us-east-1a'").as_str(),
    )
}

/// `spec.app.advertise` and a CellSet override's `advertise`.
pub fn host_port(field: &str) -> Rule {
    Rule::new(format!("self.matches('^{HOST_PORT}$')"))
        .message(format!("{field} must be host:port, e.g. shop-us-0.example.com:443").as_str())
}

/// A list of IPv4 CIDRs (`10.20.0.0/16`).
pub fn cidr_list(field: &str) -> Rule {
    Rule::new("self.all(c, c.matches('^([0-9]{1,3}[.]){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$'))")
        .message(format!("{field} entries must be IPv4 CIDRs, e.g. 10.20.0.0/16").as_str())
}

/// An external store's endpoint: `host:port`, or for Kafka a comma-separated list of them.
pub fn endpoint_list() -> Rule {
    Rule::new(format!("self.matches('^{HOST_PORT}(,{HOST_PORT})*$')")).message(
        "external.endpoint must be host:port (Kafka: a comma-separated list of host:port), e.g. db.example.com:3306; the port is required",
    )
}

/// Resource names the kubelet knows; anything else is refused on the Pod.
pub fn resource_names() -> Rule {
    Rule::new("self.all(k, k in ['cpu', 'memory', 'ephemeral-storage'] || k.startsWith('hugepages-'))")
        .message("resources may name cpu, memory, ephemeral-storage or hugepages-<size>; remove or rename the others")
}

/// The values of a `requests`/`limits` map are non-negative Kubernetes quantities.
pub fn quantities() -> Rule {
    Rule::new("self.all(k, isQuantity(self[k]) && !quantity(self[k]).isLessThan(quantity('0')))").message(
        "resources must be non-negative Kubernetes quantities, e.g. cpu: '250m' or '2', memory: '512Mi' or '4Gi'",
    )
}

/// A PersistentVolume size above zero.
pub fn storage_size() -> Rule {
    Rule::new("self.matches('^[1-9][0-9]*(Mi|Gi|Ti)$')")
        .message("storage must be a size greater than zero like '10Gi' (units Mi, Gi or Ti)")
}

/// A probe path.
pub fn http_path(field: &str, example: &str) -> Rule {
    Rule::new("self.startsWith('/')")
        .message(format!("{field} must be an HTTP path starting with '/', e.g. {example}").as_str())
}

/// Refuses `spec.app.env` entries that name a variable the operator sets.
pub fn reserved_env() -> Rule {
    let names: Vec<String> = crate::env::RESERVED
        .iter()
        .map(|n| format!("'{n}'"))
        .collect();
    let message = format!(
        "spec.app.env must not set the cell's own settings ({}): the operator sets them from the cell's stores; rename the variable",
        crate::env::RESERVED.join(", ")
    );
    Rule::new(format!("self.all(e, !(e.name in [{}]))", names.join(", "))).message(message.as_str())
}

/// An image reference the kubelet can pull: no whitespace.
pub fn image() -> Rule {
    Rule::new("!self.matches('\\\\s')").message(
        "image must be an image reference without whitespace, e.g. ghcr.io/acme/shop:1.4.2",
    )
}

/// A Secret's name (a DNS subdomain).
pub fn secret_name() -> Rule {
    Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message(
        "secretRef.name must name a Secret (lowercase letters, digits, '-', '.'), in the Cell's namespace",
    )
}

/// A Cell's own name: short enough for every object derived from it, and a DNS-1035
/// label because it names the cell's Services.
pub fn cell_name() -> [Rule; 2] {
    [
        Rule::new(format!("self.metadata.name.size() <= {MAX_CELL_NAME_LEN}")).message(
            format!(
                "metadata.name must be at most {MAX_CELL_NAME_LEN} characters: the cell's objects add up to 17 (the pods of '<name>-mysql' carry the label '<name>-mysql-<revision hash>') and Kubernetes limits those to 63; choose a shorter name"
            )
            .as_str(),
        ),
        Rule::new(format!("self.metadata.name.matches('{DNS_1035_LABEL}')")).message(
            "metadata.name must start with a lowercase letter and hold only lowercase letters, digits and '-': it names the cell's Services",
        ),
    ]
}

/// A standby is another cell.
pub fn standby_not_self() -> Rule {
    Rule::new("!has(self.spec.standby) || self.spec.standby.cell != self.metadata.name").message(
        "spec.standby.cell names the cell itself: name the cell in another region that takes over this cell's slots",
    )
}

/// A CellSet's name and its regions' names, as they make every stamped cell's name.
pub fn cellset_names() -> [Rule; 2] {
    [
        Rule::new(format!(
            "self.spec.regions.all(r, self.metadata.name.size() + r.name.size() + {STAMP_OVERHEAD} <= {MAX_CELL_NAME_LEN})"
        ))
        .message(
            format!(
                "metadata.name and spec.regions[].name are too long together: each stamped cell is named '<cellset>-<region>-<index>', which must fit a Cell's {MAX_CELL_NAME_LEN} characters (index up to 3 digits); shorten the CellSet's or the region's name"
            )
            .as_str(),
        ),
        Rule::new(format!("self.metadata.name.matches('{DNS_1035_LABEL}')")).message(
            "metadata.name must start with a lowercase letter and hold only lowercase letters, digits and '-': it begins the name of every cell the set stamps",
        ),
    ]
}

/// Overrides name cells the set stamps (`<cellset>-<region>-<index>`, index below the
/// region's count); a typo would silently do nothing.
pub fn overrides_name_stamped_cells() -> Rule {
    Rule::new(
        "!has(self.spec.overrides) || self.spec.overrides.all(k, self.spec.regions.exists(r, k.startsWith(self.metadata.name + '-' + r.name + '-') && k.substring(size(self.metadata.name) + size(r.name) + 2).matches('^(0|[1-9][0-9]{0,2})$') && int(k.substring(size(self.metadata.name) + size(r.name) + 2)) < r.cells))",
    )
    .message(
        "spec.overrides: every key must name a cell the set stamps, '<cellset>-<region>-<index>' with index below the region's cells; fix the name or the region's count",
    )
}
