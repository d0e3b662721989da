"""How every settings class reads its variables."""

from pydantic_settings import SettingsConfigDict

CONFIG = SettingsConfigDict(
    env_prefix="IMAGEGEN_", env_file=".env", env_ignore_empty=True, extra="ignore"
)
